"""Instructions per streamed turn: the server under callgrind, counts that machine load cannot move.

On a shared machine CPU seconds drift with everyone else's work (caches,
hyper-threads, steal); the number of instructions a turn executes does not.
This starts a private Redis and the simulated upstream (50 ms to the first
token, 32 tokens 20 ms apart, as the `cpu` scenario), runs `korero serve`
under ``valgrind --tool=callgrind``, warms it up, zeroes the counters, runs
sequential turns of a few conversations, and reads the instruction count of
exactly those turns from a callgrind dump. The offered load is low enough
that even the ~50× slower server reads every token on its own (no batching
a faster server would not do).

    .venv/bin/python -m bench.instructions [--turns 40] [--baseline-python PATH]

Valgrind's start-up of the server (imports at ~50× slower) takes 2–3 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import ProcessGroup, _wait_port, free_port, loadavg

TURN_SIM = {"ttft_ms": 50.0, "tokens_per_second": 50.0, "answer_tokens": 32}
QUESTION = "What is the baggage allowance on my booking?"


VALGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"
CALLGRIND_CONTROL = shutil.which("callgrind_control") or "/usr/bin/callgrind_control"


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run([CALLGRIND_CONTROL, *args, str(pid)], check=True, capture_output=True)


def _dumped_instructions(pattern: str, before: set[str]) -> int:
    """Instructions in the dump files written since `before` (summary lines)."""
    total = 0
    for path in sorted(set(glob.glob(pattern)) - before):
        text = Path(path).read_text(errors="replace")
        if not text.rstrip().endswith(tuple("0123456789")):  # still being written
            return 0
        for line in text.splitlines():
            if line.startswith("summary:"):
                total += int(line.split()[1])
    return total


async def _turns(host: str, conversations: int, turns: int) -> int:
    from korero.chat.v1 import chat_pb2 as pb  # noqa: PLC0415
    from korero.client import ChatClient  # noqa: PLC0415

    done = 0
    async with ChatClient(host) as client:

        async def one(c: int) -> None:
            nonlocal done
            conversation = await client.conversation()
            for t in range(turns):
                async for event in conversation.send(QUESTION, f"i{c}-{t}-{time.time_ns()}"):
                    if event.WhichOneof("kind") == "done":
                        done += 1
                    elif event.WhichOneof("kind") == "error":
                        print(f"turn error: {event.error.reason}", file=sys.stderr)
                await asyncio.sleep(0.2)

        await asyncio.gather(*(one(c) for c in range(conversations)))
    del pb
    return done


def measure(python: str, *, conversations: int, turns: int, workdir: Path) -> dict[str, float]:
    """Instructions per turn of the server run by `python` (after a warm-up)."""
    with ProcessGroup() as g:
        redis_url, _, _ = g.redis()
        llm, _ = g.sim(**TURN_SIM)  # type: ignore[arg-type]
        port = free_port()
        out = workdir / "callgrind.out.%p"
        env = {
            **os.environ,
            "KORERO_LISTEN": f"127.0.0.1:{port}",
            "REDIS_URL": redis_url,
            "KORERO_LLM_BASE_URL": llm,
            "KORERO_LLM_API_KEY": "bench",
            "KORERO_LOG_LEVEL": "WARNING",
            "KORERO_SESSION_MESSAGES_PER_MINUTE": "1000000",
            "KORERO_TENANT_REQUESTS_PER_MINUTE": "1000000000",
            "KORERO_TENANT_TOKENS_PER_MINUTE": "1000000000000",
            # Generous under valgrind's slowness; never reached by a healthy turn.
            "KORERO_REDIS_TIMEOUT": "30",
            "KORERO_FIRST_TOKEN_TIMEOUT": "60",
        }
        proc = subprocess.Popen(
            [
                VALGRIND,
                "--tool=callgrind",
                "--trace-children=yes",  # `python` may be a wrapper script that execs
                f"--callgrind-out-file={out}",
                python,
                "-m",
                "korero.client.cli",
                "serve",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        g.procs.append(proc)
        _wait_port(port, proc, 900, "korero serve under valgrind")
        host = f"127.0.0.1:{port}"
        asyncio.run(_turns(host, 2, 3))  # warm-up: imports on first use, pools, scripts
        time.sleep(2)
        before = set(glob.glob(str(workdir / "callgrind.out.*")))
        _callgrind(proc.pid, "--zero")
        t0 = time.monotonic()
        done = asyncio.run(_turns(host, conversations, turns))
        wall = time.monotonic() - t0
        _callgrind(proc.pid, "--dump=measured")
        instructions = 0
        for _ in range(120):  # the dump is written by the (slow) server itself
            instructions = _dumped_instructions(str(workdir / "callgrind.out.*"), before)
            if instructions:
                break
            time.sleep(1)
    return {"turns": done, "instructions": instructions, "perTurn": instructions / max(1, done),
            "wall": wall}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=10, help="turns per conversation")
    p.add_argument("--baseline-python", help="also measure the server run by this interpreter")
    p.add_argument("--keep", help="keep the callgrind dumps in this directory")
    args = p.parse_args(argv)
    if not Path(VALGRIND).exists():
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    variants = [("this tree", sys.executable)]
    if args.baseline_python:
        variants.append(("baseline", args.baseline_python))
    print(f"load average {loadavg():.2f}", flush=True)
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="korero-callgrind-"))
    for name, python in variants:
        workdir = scratch / name.replace(" ", "-")
        workdir.mkdir(parents=True, exist_ok=True)
        r = measure(python, conversations=args.conversations, turns=args.turns, workdir=workdir)
        print(
            f"{name}: {r['perTurn'] / 1e6:.2f} M instructions per turn "
            f"({int(r['turns'])} turns, {r['instructions'] / 1e6:.0f} M, {r['wall']:.0f} s)",
            flush=True,
        )
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load average {loadavg():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

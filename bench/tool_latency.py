"""Added latency of one tool round trip, measured against a turn without tools in the same run.

    .venv/bin/python bench/tool_latency.py [--turns 200] [--ttft-ms 0]

Starts a private redis-server, the simulated upstream, the sample airline
service and three Kōrero servers in this process: two with the sample tools
(KORERO_TOOLS_MAX_ROUNDS=3) — one with the tool result cache off, so every
turn makes the HTTP call, one with it on (KORERO_TOOLS_RESULT_CACHE_SECONDS,
60 s: after the first turn the flight's status comes from Redis) — and one
with tools off (0). All are asked the same question, "What is the status of
flight NZ101?", in turn, from the client on the same loop. With tools the
turn is: model call 1 (streams a tool call) → HTTP GET to the airline
service (or the cached result) → model call 2 (answers from the data);
without tools: one model call. Reported: time to the first text
delta and to `done`, p50/p95, and the difference (tools minus reference) —
the cost of one tool round trip including the extra model call, which with
a real model also pays its time to first token again (--ttft-ms).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from korero.airline import AirlineFault, AirlineService  # noqa: E402
from korero.client import ChatClient, Conversation  # noqa: E402
from korero.server.app import KoreroServer  # noqa: E402
from korero.server.cli.tools import load_tool_file  # noqa: E402
from korero.server.settings import (  # noqa: E402
    LLMSettings,
    ObservabilitySettings,
    RateLimitSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    ToolSettings,
)
from korero.server.tools import ToolRegistry  # noqa: E402
from korero.sim import SimConfig, UpstreamSim  # noqa: E402
from korero.testing import PrivateRedis  # noqa: E402

QUESTION = "What is the status of flight NZ101?"


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _turn(conversation: Conversation) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = None
    tools = 0
    async for event in conversation.send(QUESTION):
        kind = event.WhichOneof("kind")
        if kind == "text_delta" and first is None:
            first = time.perf_counter()
        if kind == "tool_call_finished":
            tools += 1
    end = time.perf_counter()
    assert first is not None
    return (first - started) * 1000, (end - started) * 1000, tools


async def _run(args: argparse.Namespace, redis_url: str) -> None:
    async with UpstreamSim(SimConfig(ttft=args.ttft_ms / 1000)) as sim, AirlineService() as airline:
        client = aioredis.Redis.from_url(redis_url)
        for spec in load_tool_file((ROOT / "tools" / "sample.json").read_text(), airline.base_url):
            await ToolRegistry(client).put("default", spec)
        await client.aclose()

        def settings(rounds: int, cache_seconds: float = 0.0) -> Settings:
            return Settings(
                server=ServerSettings(listen="127.0.0.1:0", ws_listen=None),
                redis=RedisSettings(url=redis_url),
                llm=LLMSettings(base_url=sim.base_url, api_key="bench"),
                limits=RateLimitSettings(
                    session_messages_per_minute=10**6,
                    tenant_requests_per_minute=10**9,
                    tenant_tokens_per_minute=10**12,
                ),
                observability=ObservabilitySettings(metrics_listen=None),
                tools=ToolSettings(max_rounds=rounds, result_cache_seconds=cache_seconds),
            )

        with_tools = await KoreroServer.start(settings(3))
        cached = await KoreroServer.start(settings(3, cache_seconds=60.0))
        without = await KoreroServer.start(settings(0))
        try:
            async with (
                ChatClient(f"127.0.0.1:{with_tools.port}") as a,
                ChatClient(f"127.0.0.1:{cached.port}") as c,
                ChatClient(f"127.0.0.1:{without.port}") as b,
            ):
                conv_tools, conv_cached = await a.conversation(), await c.conversation()
                conv_ref = await b.conversation()
                for _ in range(20):  # warm-up (and the cached server's one HTTP call)
                    await _turn(conv_tools)
                    await _turn(conv_cached)
                    await _turn(conv_ref)
                if args.service_ms > 0:  # every measured data request takes this long
                    delay = AirlineFault("delay", args.service_ms / 1000, count=10**6)
                    airline.inject(delay)
                calls_before = len(airline.requests)
                tools_first, tools_done, ref_first, ref_done = [], [], [], []
                hit_first, hit_done = [], []
                for _ in range(args.turns):
                    first, done, calls = await _turn(conv_tools)
                    assert calls == 1
                    tools_first.append(first)
                    tools_done.append(done)
                    first, done, calls = await _turn(conv_cached)
                    assert calls == 1
                    hit_first.append(first)
                    hit_done.append(done)
                    first, done, calls = await _turn(conv_ref)
                    assert calls == 0
                    ref_first.append(first)
                    ref_done.append(done)
                http_calls = len(airline.requests) - calls_before
        finally:
            for server in (with_tools, cached, without):
                await server.shutdown(grace=0)

    print(
        f"turns: {args.turns} each, simulated TTFT {args.ttft_ms:g} ms, data service"
        f" +{args.service_ms:g} ms, one tool call per turn"
    )
    print(f"HTTP calls to the airline service in the measured turns: {http_calls}")
    print(
        "| measure | without tools | one tool round trip | added | result from the cache | added |"
    )
    print("|---|---|---|---|---|---|")
    for name, ref, tool, hit in (
        ("first text delta", ref_first, tools_first, hit_first),
        ("whole turn (done)", ref_done, tools_done, hit_done),
    ):
        for q, label in ((0.5, "p50"), (0.95, "p95")):
            r, t, h = _pct(ref, q), _pct(tool, q), _pct(hit, q)
            print(
                f"| {name} {label} | {r:.2f} ms | {t:.2f} ms | +{t - r:.2f} ms"
                f" | {h:.2f} ms | +{h - r:.2f} ms |"
            )
    added = statistics.mean(tools_first) - statistics.mean(ref_first)
    print(f"mean added to first delta: +{added:.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument(
        "--service-ms",
        type=float,
        default=0.0,
        help="delay every data request of the airline service by this much (a remote service)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, PrivateRedis(Path(workdir)) as redis_server:
        asyncio.run(_run(args, redis_server.url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

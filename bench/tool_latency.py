"""Added latency of one tool round trip, measured against a turn without tools in the same run.

    .venv/bin/python bench/tool_latency.py [--turns 200] [--ttft-ms 0]

Starts a private redis-server, the simulated upstream, the sample airline
service and two Kōrero servers in this process: one with the sample tools
(KORERO_TOOLS_MAX_ROUNDS=3), one with tools off (0). Both are asked the same
question, "What is the status of flight NZ101?", alternately, from the
client on the same loop. With tools the turn is: model call 1 (streams a
tool call) → HTTP GET to the airline service → model call 2 (answers from
the data); without tools: one model call. Reported: time to the first text
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

from korero.airline import AirlineService  # noqa: E402
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

        def settings(rounds: int) -> Settings:
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
                tools=ToolSettings(max_rounds=rounds),
            )

        with_tools = await KoreroServer.start(settings(3))
        without = await KoreroServer.start(settings(0))
        try:
            async with (
                ChatClient(f"127.0.0.1:{with_tools.port}") as a,
                ChatClient(f"127.0.0.1:{without.port}") as b,
            ):
                conv_tools, conv_ref = await a.conversation(), await b.conversation()
                for _ in range(20):  # warm-up
                    await _turn(conv_tools)
                    await _turn(conv_ref)
                tools_first, tools_done, ref_first, ref_done = [], [], [], []
                for _ in range(args.turns):
                    first, done, calls = await _turn(conv_tools)
                    assert calls == 1
                    tools_first.append(first)
                    tools_done.append(done)
                    first, done, calls = await _turn(conv_ref)
                    assert calls == 0
                    ref_first.append(first)
                    ref_done.append(done)
        finally:
            await with_tools.shutdown(grace=0)
            await without.shutdown(grace=0)

    print(f"turns: {args.turns} each, simulated TTFT {args.ttft_ms:g} ms, one tool call per turn")
    print("| measure | without tools | with one tool round trip | added |")
    print("|---|---|---|---|")
    for name, ref, tool in (
        ("first text delta", ref_first, tools_first),
        ("whole turn (done)", ref_done, tools_done),
    ):
        for q, label in ((0.5, "p50"), (0.95, "p95")):
            r, t = _pct(ref, q), _pct(tool, q)
            print(f"| {name} {label} | {r:.2f} ms | {t:.2f} ms | +{t - r:.2f} ms |")
    added = statistics.mean(tools_first) - statistics.mean(ref_first)
    print(f"mean added to first delta: +{added:.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, PrivateRedis(Path(workdir)) as redis_server:
        asyncio.run(_run(args, redis_server.url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""First-delta latency of a cached answer, and LLM calls saved on a repeated-question workload.

    .venv/bin/python bench/cache_ttft.py [--turns 300] [--ttft-ms 150]

Starts a private redis-server on a free port, the simulated upstream and the
Kōrero server (port 0, in this process, with the client on the same event
loop), ingests kb/sample, and measures from the client:

1. cached: time from sending a message to its first `text_delta` when the
   answer comes from the response cache (p50/p95/p99 over --turns turns);
2. uncached reference: the same for an uncacheable (personal) question,
   with the simulated model's time to first token (--ttft-ms) included;
3. workload: --turns questions, each from a new session (another customer),
   drawn with repeats from kb/eval/questions.json (Zipf-like popularity,
   random case/punctuation/courtesy variants, one in five made personal with
   "for my booking"), counting the turns that needed an LLM call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from korero.client import ChatClient, Conversation  # noqa: E402
from korero.server.app import KoreroServer  # noqa: E402
from korero.server.settings import (  # noqa: E402
    LLMSettings,
    ObservabilitySettings,
    RateLimitSettings,
    RedisSettings,
    ServerSettings,
    Settings,
)
from korero.sim import SimConfig, UpstreamSim  # noqa: E402
from korero.testing import PrivateRedis  # noqa: E402
from tests.helpers import ingest_sample  # noqa: E402

CACHED_QUESTION = "What's the checked baggage allowance?"


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return (
        f"p50 {statistics.median(ordered):.2f} ms, p95 {pick(0.95):.2f} ms, "
        f"p99 {pick(0.99):.2f} ms (n={len(ordered)})"
    )


async def _first_delta_ms(conversation: Conversation, text: str) -> tuple[float, bool]:
    started = time.perf_counter()
    first: float | None = None
    cached = False
    async for event in conversation.send(text):
        kind = event.WhichOneof("kind")
        if kind == "text_delta" and first is None:
            first = (time.perf_counter() - started) * 1000
        if kind == "done":
            cached = event.done.cached
    assert first is not None
    return first, cached


def _variant(rng: random.Random, question: str) -> str:
    q = question
    if rng.random() < 0.3:
        q = q.lower()
    if rng.random() < 0.3:
        q = "Hi, " + q
    if rng.random() < 0.3:
        q = q.rstrip("?") + " please?"
    if rng.random() < 0.2:
        q = q.replace("?", "") + " for my booking?"
    return q


async def _run(args: argparse.Namespace, redis_url: str) -> None:
    async with UpstreamSim(SimConfig(ttft=args.ttft_ms / 1000)) as sim:
        settings = Settings(
            server=ServerSettings(listen="127.0.0.1:0"),
            redis=RedisSettings(url=redis_url),
            llm=LLMSettings(base_url=sim.base_url, api_key="bench"),
            # The limiter stays on (its round trip is part of a turn) with budgets
            # this run cannot reach: 300+ turns on one session would hit 30/min.
            limits=RateLimitSettings(
                session_messages_per_minute=10**6,
                tenant_requests_per_minute=10**9,
                tenant_tokens_per_minute=10**12,
            ),
            observability=ObservabilitySettings(metrics_listen=None),
        )
        await ingest_sample(redis_url)
        app = await KoreroServer.start(settings)
        try:
            async with ChatClient(f"127.0.0.1:{app.port}") as client:
                conversation = await client.conversation()
                await _first_delta_ms(conversation, CACHED_QUESTION)  # fills the cache
                for _ in range(20):  # warm-up
                    await _first_delta_ms(conversation, CACHED_QUESTION)
                cached = []
                for _ in range(args.turns):
                    ms, hit = await _first_delta_ms(conversation, CACHED_QUESTION)
                    assert hit
                    cached.append(ms)
                uncached = []
                for _ in range(min(50, args.turns)):
                    ms, hit = await _first_delta_ms(
                        await client.conversation(), "What's the baggage allowance for my flight?"
                    )
                    assert not hit
                    uncached.append(ms)
                print(f"cached answer, first delta: {_percentiles(cached)}")
                print(
                    f"uncached (personal) answer, first delta, sim TTFT {args.ttft_ms:g} ms: "
                    f"{_percentiles(uncached)}"
                )

                questions = json.loads((ROOT / "kb/eval/questions.json").read_text())["questions"]
                pool = [str(q) for q, _ in questions]
                rng = random.Random(4)
                weights = [1 / (rank + 1) for rank in range(len(pool))]  # Zipf-like
                calls_before = len(sim.requests)
                hits = 0
                for _ in range(args.turns):
                    question = _variant(rng, rng.choices(pool, weights)[0])
                    # Each question from another customer (a new session).
                    _, hit = await _first_delta_ms(await client.conversation(), question)
                    hits += hit
                calls = len(sim.requests) - calls_before
                stats = app.engine.cache.stats if app.engine.cache else None
                print(
                    f"workload: {args.turns} turns, {calls} LLM calls, {hits} cache hits: "
                    f"{1 - calls / args.turns:.0%} of LLM calls saved "
                    f"(fallback answers, which never call the model, count as saved too); "
                    f"saved tokens {stats.saved_tokens if stats else 0}"
                )
        finally:
            await app.shutdown(grace=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--ttft-ms", type=float, default=150.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, PrivateRedis(Path(workdir)) as redis_server:
        asyncio.run(_run(args, redis_server.url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

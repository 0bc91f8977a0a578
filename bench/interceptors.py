"""Added latency of the interceptors (auth, rate limits, tracing) per call and per message.

Runs two in-process servers against one private Redis and the simulated
upstream (no delay): `bare` (auth off, limits off, no tracing) and `full`
(API-key auth, all three rate limits, OpenTelemetry spans through a batch
processor that drops them). Calls alternate between the two in rounds so
machine noise hits both alike, and the report is the difference and ratio of
medians and p99s measured in the same run.

    .venv/bin/python -m bench.interceptors [--rounds 20] [--per-round 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.server.policy.tokens import ApiKeyStore
from korero.server.settings import (
    AuthSettings,
    EngineSettings,
    LLMSettings,
    ObservabilitySettings,
    RateLimitSettings,
    RedisSettings,
    ServerSettings,
    Settings,
)
from korero.sim import SimConfig, UpstreamSim
from korero.testing import PrivateRedis


class _Drop(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _settings(redis_url: str, llm_url: str, full: bool) -> Settings:
    return Settings(
        server=ServerSettings(listen="127.0.0.1:0"),
        redis=RedisSettings(url=redis_url),
        llm=LLMSettings(base_url=llm_url, api_key="bench"),
        engine=EngineSettings(),
        auth=AuthSettings(mode="on" if full else "off"),
        limits=RateLimitSettings(
            enabled=full,
            session_messages_per_minute=10**9,
            tenant_requests_per_minute=10**9,
            tenant_tokens_per_minute=10**12,
        ),
        observability=ObservabilitySettings(metrics_listen=None),
    )


async def _measure(rounds: int, per_round: int) -> dict[str, Any]:
    workdir = tempfile.mkdtemp()
    redis = PrivateRedis(Path(workdir))
    redis.start()
    try:
        redis_url = redis.url
        async with UpstreamSim(SimConfig(answer_tokens=5)) as sim:
            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(_Drop()))
            bare = await KoreroServer.start(_settings(redis_url, sim.base_url, False))
            full = await KoreroServer.start(
                _settings(redis_url, sim.base_url, True), tracer_provider=provider
            )
            key, _ = await ApiKeyStore(full.store.redis).create("bench")
            try:
                return await _rounds(bare, full, key, rounds, per_round)
            finally:
                await bare.shutdown(grace=0)
                await full.shutdown(grace=0)
    finally:
        redis.stop()


async def _rounds(
    bare: KoreroServer, full: KoreroServer, key: str, rounds: int, per_round: int
) -> dict[str, Any]:
    timings: dict[str, dict[str, list[float]]] = {
        name: {"unary": [], "message": []} for name in ("bare", "full")
    }
    clients = {
        "bare": ChatClient(f"127.0.0.1:{bare.port}"),
        "full": ChatClient(f"127.0.0.1:{full.port}", metadata=[("authorization", f"Bearer {key}")]),
    }
    try:
        conversations = {n: await c.conversation() for n, c in clients.items()}
        sessions = {n: conv.session_id for n, conv in conversations.items()}
        counter = 0
        for r in range(rounds + 1):  # round 0 warms up and is discarded
            for name in ("bare", "full") if r % 2 else ("full", "bare"):
                client, conversation = clients[name], conversations[name]
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    await client.stub.GetSession(
                        pb.GetSessionRequest(session_id=sessions[name]),
                        metadata=client._metadata,
                    )
                    unary = time.perf_counter() - t0
                    counter += 1
                    t0 = time.perf_counter()
                    async for _event in conversation.send("ping", f"b{counter}"):
                        pass
                    message = time.perf_counter() - t0
                    if r:
                        timings[name]["unary"].append(unary)
                        timings[name]["message"].append(message)
    finally:
        for client in clients.values():
            await client.close()
    report: dict[str, Any] = {
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
        "samples_per_kind": rounds * per_round,
    }
    for kind in ("unary", "message"):
        bare_v, full_v = timings["bare"][kind], timings["full"][kind]
        report[kind] = {
            "bare_p50_ms": statistics.median(bare_v) * 1e3,
            "full_p50_ms": statistics.median(full_v) * 1e3,
            "added_p50_ms": (statistics.median(full_v) - statistics.median(bare_v)) * 1e3,
            "bare_p99_ms": _pct(bare_v, 0.99) * 1e3,
            "full_p99_ms": _pct(full_v, 0.99) * 1e3,
            "ratio_p50": statistics.median(full_v) / statistics.median(bare_v),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds [%(default)s]")
    parser.add_argument("--per-round", type=int, default=50, help="calls per round [%(default)s]")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    report = asyncio.run(_measure(args.rounds, args.per_round))
    print(f"grpcio {report['grpcio']}, {report['samples_per_kind']} samples per kind")
    print(
        f"{'kind':<10}{'bare p50':>10}{'full p50':>10}{'added':>10}{'ratio':>8}"
        f"{'bare p99':>10}{'full p99':>10}"
    )
    for kind in ("unary", "message"):
        k = report[kind]
        print(
            f"{kind:<10}{k['bare_p50_ms']:>8.2f}ms{k['full_p50_ms']:>8.2f}ms"
            f"{k['added_p50_ms']:>8.2f}ms{k['ratio_p50']:>8.2f}"
            f"{k['bare_p99_ms']:>8.2f}ms{k['full_p99_ms']:>8.2f}ms"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

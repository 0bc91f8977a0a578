"""The ops snapshot (`/ops/stats`): numbers from the metrics registry, the admin token."""

from __future__ import annotations

import aiohttp
import pytest

from korero.server.app import KoreroServer
from korero.server.ops import OpsStats, quantile
from korero.server.telemetry import Metrics
from korero.sim import UpstreamSim
from tests.conftest import make_settings
from tests.helpers import kinds, run_turn


def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = [(0.1, 10.0), (0.2, 20.0), (0.4, 40.0), (float("inf"), 40.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.2)
    assert quantile(0.25, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.2 + 0.2 * (30 - 20) / 20)
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert quantile(0.99, [(0.1, 1.0), (float("inf"), 5.0)]) == 0.1  # beyond the last bound


def test_window_figures_are_differences_since_the_oldest_sample() -> None:
    now = [100.0]
    metrics = Metrics()
    ops = OpsStats(metrics, "t", clock=lambda: now[0])
    for _ in range(4):  # before the window starts
        metrics.turn_ended(tenant="t", model="m", outcome="stop", reason="", duration=0.5,
                           time_to_first_token=2.0, input_tokens=1, output_tokens=1)  # fmt: skip
    metrics.cache_requests.labels("miss").inc()
    ops.sample()
    now[0] = 110.0
    for _ in range(20):
        metrics.turn_ended(tenant="t", model="m", outcome="stop", reason="", duration=0.5,
                           time_to_first_token=0.03, input_tokens=1, output_tokens=1)  # fmt: skip
    metrics.cache_requests.labels("hit").inc(3)
    metrics.cache_requests.labels("miss").inc(1)
    metrics.rate_limit_rejections.labels("tenant_requests").inc(2)
    metrics.active_streams.inc(5)
    stats = ops.stats()
    assert stats["window_seconds"] == 10.0
    assert stats["turns_per_second"] == 2.0
    assert 0.025 <= stats["ttft_seconds"]["p95"] <= 0.05  # the old 2 s turns are outside
    assert stats["cache_hit_rate"] == 0.75
    assert stats["limits_hit"] == {"tenant_requests": 2.0}
    assert stats["active_streams"] == 5
    assert stats["totals"]["turns"] == 24


async def test_the_endpoint_needs_the_token_and_reports_a_real_turn(
    redis_url: str, sim: UpstreamSim
) -> None:
    app = await KoreroServer.start(
        make_settings(redis_url, sim.base_url, observability__ops_token="s3cret")
    )
    try:
        assert app.websocket is not None
        url = f"http://127.0.0.1:{app.websocket.port}/ops/stats"
        from korero.client import ChatClient  # noqa: PLC0415

        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            assert kinds(await run_turn(conversation, "Hello", "o1"))[-1] == "done"
            async with aiohttp.ClientSession() as http:
                for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
                    async with http.get(url, headers=headers) as refused:
                        assert refused.status == 401
                auth = {"Authorization": "Bearer s3cret"}
                async with http.get(url, headers=auth) as ok:
                    assert ok.status == 200
                    assert ok.headers["Cache-Control"] == "no-store"
                    stats = await ok.json()
        assert stats["active_streams"] == 1
        assert stats["totals"]["turns"] == 1
        assert stats["totals"]["ttft_seconds"]["p50"] > 0
    finally:
        await app.shutdown(grace=0)


async def test_without_a_token_there_is_no_endpoint(redis_url: str, sim: UpstreamSim) -> None:
    app = await KoreroServer.start(make_settings(redis_url, sim.base_url))
    try:
        assert app.ops is None
        assert app.websocket is not None
        url = f"http://127.0.0.1:{app.websocket.port}/ops/stats"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            assert response.status == 404
    finally:
        await app.shutdown(grace=0)

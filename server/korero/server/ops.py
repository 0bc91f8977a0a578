"""The live operations snapshot: `GET /ops/stats` on the WebSocket listener.

The ops page (`clients/web/static/ops.html`, through Envoy) polls this every
few seconds. Everything is computed from the Prometheus registry the
server already keeps — in a multi-worker server, the sum over all workers
(`Metrics.view()`), so whichever worker answers gives the same numbers:

    active_streams        open Chat streams and SendMessage calls, now
    turns_per_second      turns ended per second over the recent window
    ttft_seconds          p50 and p95 time to first token over the window,
                          interpolated from the histogram buckets
    cache_hit_rate        response-cache hits / lookups over the window
    limits_hit            rate-limit refusals in the window, by limit
    upstream_errors       failed LLM calls in the window, by reason
    redis_errors          failed Redis calls in the window

plus the same counts since start (`totals`). A background task samples the
registry every `SAMPLE_SECONDS`; the window is the span back to the oldest
sample younger than `WINDOW_SECONDS`. Protected by `KORERO_OPS_TOKEN`
(`Authorization: Bearer …`); no labels carry tenant data beyond what the
metrics already do, and no message text exists in the registry at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from korero.server.telemetry import Metrics

__all__ = ["OPS_PATH", "OpsStats", "Snapshot", "quantile"]

OPS_PATH = "/ops/stats"
SAMPLE_SECONDS = 2.0
WINDOW_SECONDS = 30.0


@dataclass(frozen=True)
class Snapshot:
    """Counter values (since start) and the open-stream gauge at one moment."""

    at: float
    active_streams: float = 0.0
    turns: float = 0.0
    ttft_buckets: tuple[tuple[float, float], ...] = ()
    """(upper bound, cumulative count), ascending, +Inf last."""
    cache: Mapping[str, float] = field(default_factory=dict)
    limits: Mapping[str, float] = field(default_factory=dict)
    upstream_errors: Mapping[str, float] = field(default_factory=dict)
    redis_errors: float = 0.0

    @classmethod
    def read(cls, metrics: Metrics, at: float) -> Snapshot:
        values: dict[str, Any] = {
            "active": 0.0,
            "turns": 0.0,
            "buckets": {},
            "cache": {},
            "limits": {},
            "upstream": {},
            "redis": 0.0,
        }
        for family in metrics.view().collect():
            for sample in family.samples:
                _take(values, sample.name, sample.labels, sample.value)
        buckets = tuple(sorted(values["buckets"].items()))
        return cls(
            at=at,
            active_streams=values["active"],
            turns=values["turns"],
            ttft_buckets=buckets,
            cache=values["cache"],
            limits=values["limits"],
            upstream_errors=values["upstream"],
            redis_errors=values["redis"],
        )


def _take(values: dict[str, Any], name: str, labels: Mapping[str, str], value: float) -> None:
    if name == "korero_active_streams":
        values["active"] += value
    elif name == "korero_turns_total":
        values["turns"] += value
    elif name == "korero_time_to_first_token_seconds_bucket":
        bound = float(labels["le"])
        values["buckets"][bound] = values["buckets"].get(bound, 0.0) + value
    elif name == "korero_cache_requests_total":
        _add(values["cache"], labels.get("result", ""), value)
    elif name == "korero_rate_limit_rejections_total":
        _add(values["limits"], labels.get("limit", ""), value)
    elif name == "korero_upstream_errors_total":
        _add(values["upstream"], labels.get("reason", ""), value)
    elif name == "korero_redis_errors_total":
        values["redis"] += value


def _add(counts: dict[str, float], key: str, value: float) -> None:
    counts[key] = counts.get(key, 0.0) + value


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile` over cumulative (bound, count) buckets."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # above the largest finite bucket: its bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def _delta(now: Mapping[str, float], then: Mapping[str, float]) -> dict[str, float]:
    out = {k: v - then.get(k, 0.0) for k, v in now.items()}
    return {k: v for k, v in out.items() if v > 0}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


class OpsStats:
    """Samples the metrics and answers `/ops/stats` for holders of the admin token."""

    def __init__(
        self,
        metrics: Metrics,
        token: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sample_seconds: float = SAMPLE_SECONDS,
        window_seconds: float = WINDOW_SECONDS,
    ) -> None:
        self._metrics = metrics
        self._token = token.encode()
        self._clock = clock
        self._sample_seconds = sample_seconds
        self._window = window_seconds
        self._samples: deque[Snapshot] = deque()
        self._task: asyncio.Task[None] | None = None

    def routes(self) -> list[web.RouteDef]:
        return [web.get(OPS_PATH, self.handle)]

    async def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(self._sample_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sample_seconds)
            self.sample()

    def sample(self) -> Snapshot:
        """Take a sample of the counters now (the sampler does every `sample_seconds`)."""
        snapshot = Snapshot.read(self._metrics, self._clock())
        self._samples.append(snapshot)
        while len(self._samples) > 1 and snapshot.at - self._samples[0].at > self._window:
            self._samples.popleft()
        return snapshot

    def stats(self) -> dict[str, Any]:
        """The JSON body of `/ops/stats`."""
        now = Snapshot.read(self._metrics, self._clock())
        base = self._samples[0] if self._samples else now
        span = now.at - base.at
        ttft = [(b, c - dict(base.ttft_buckets).get(b, 0.0)) for b, c in now.ttft_buckets]
        cache = _delta(now.cache, base.cache)
        lookups = sum(cache.values())
        totals_lookups = sum(now.cache.values())
        return {
            "window_seconds": round(span, 1),
            "active_streams": int(now.active_streams),
            "turns_per_second": _round((now.turns - base.turns) / span) if span > 0 else None,
            "ttft_seconds": {
                "p50": _round(quantile(0.5, ttft)),
                "p95": _round(quantile(0.95, ttft)),
            },
            "cache_hit_rate": _round(cache.get("hit", 0.0) / lookups) if lookups else None,
            "limits_hit": _delta(now.limits, base.limits),
            "upstream_errors": _delta(now.upstream_errors, base.upstream_errors),
            "redis_errors": now.redis_errors - base.redis_errors,
            "totals": {
                "turns": now.turns,
                "ttft_seconds": {
                    "p50": _round(quantile(0.5, now.ttft_buckets)),
                    "p95": _round(quantile(0.95, now.ttft_buckets)),
                },
                "cache_hit_rate": (
                    _round(now.cache.get("hit", 0.0) / totals_lookups) if totals_lookups else None
                ),
                "limits_hit": dict(now.limits),
                "upstream_errors": dict(now.upstream_errors),
                "redis_errors": now.redis_errors,
            },
        }

    async def handle(self, request: web.Request) -> web.Response:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), self._token
        ):
            return web.json_response(
                {"error": "UNAUTHENTICATED", "message": "send Authorization: Bearer <ops token>"},
                status=401,
                headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"},
            )
        return web.json_response(self.stats(), headers={"Cache-Control": "no-store"})

"""Observability: Prometheus metrics and OpenTelemetry tracing.

Metrics live in a registry owned by the server instance (not the global
one), served on their own port by aiohttp in the server's event loop. When
`korero serve` runs several worker processes, each one writes its values to
prometheus-client's multiprocess files (the directory the supervisor
created) and every worker's `/metrics` — one port shared with SO_REUSEPORT —
answers with the sum over all of them, so any worker gives the same view.
Labels carry tenant, model, outcome and reason codes only: message text and
personal data never appear in labels, span attributes or logs.

Tracing uses the maintained instrumentations where they work with
grpc.aio: `opentelemetry-instrumentation-grpc`'s aio server interceptor
(one span per RPC, continuing an incoming W3C `traceparent`) and
`opentelemetry-instrumentation-redis` on our Redis client (one span per
command or pipeline, arguments replaced by `?`). The turn and its stages
are our own spans, created by the engine through `TurnTracer`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from korero.server.settings import ObservabilitySettings

__all__ = ["Metrics", "build_tracer_provider", "serve_metrics", "span"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Metrics:
    """Every metric the server exports, in its own registry."""

    def __init__(
        self, settings: ObservabilitySettings | None = None, *, multiprocess_dir: Path | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        """Set in worker processes: values live in files there, summed over workers."""
        settings = settings or ObservabilitySettings()
        self._price_in = settings.price_input_per_mtok / 1e6
        self._price_out = settings.price_output_per_mtok / 1e6
        r = self.registry
        self.active_streams = Gauge(
            "korero_active_streams",
            "Open Chat streams and SendMessage calls",
            registry=r,
            multiprocess_mode="livesum",  # over the live workers; ignored in one process
        )
        self.turns = Counter(
            "korero_turns", "Turns ended, by outcome and reason", ["outcome", "reason"], registry=r
        )
        self.time_to_first_token = Histogram(
            "korero_time_to_first_token_seconds",
            "From the start of a turn to its first text delta",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.turn_duration = Histogram(
            "korero_turn_duration_seconds",
            "From the start of a turn to its terminal event",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_tokens = Counter(
            "korero_llm_tokens",
            "LLM tokens by tenant, model and direction (input/output)",
            ["tenant", "model", "direction"],
            registry=r,
        )
        self.llm_cost = Counter(
            "korero_llm_cost_usd",
            "Estimated LLM cost in USD (from KORERO_PRICE_*_PER_MTOK)",
            ["tenant", "model"],
            registry=r,
        )
        self.cache_requests = Counter(
            "korero_cache_requests", "Response cache lookups by result", ["result"], registry=r
        )
        self.rate_limit_rejections = Counter(
            "korero_rate_limit_rejections",
            "Requests refused by a rate limit",
            ["limit"],
            registry=r,
        )
        self.session_opens_refused = Counter(
            "korero_session_opens_refused",
            "Session opens refused with SESSION_OPENS_BUSY (policy/pacing.py), by why: "
            "queue_full, waited_too_long",
            ["why"],
            registry=r,
        )
        self.auth_throttled = Counter(
            "korero_auth_throttled",
            "Calls refused with AUTH_THROTTLED before their key lookup (policy/throttle.py), "
            "by the budget that was used up: peer (client address), tenant",
            ["scope"],
            registry=r,
        )
        self.rate_limit_fallbacks = Counter(
            "korero_rate_limit_fallbacks",
            "Limit checks decided by the local limiter because Redis was unreachable",
            registry=r,
        )
        self.redis_errors = Counter(
            "korero_redis_errors", "Failed Redis calls by reason", ["reason"], registry=r
        )
        self.early_requests = Counter(
            "korero_early_requests",
            "Upstream requests sent before the turn began (conversation/early.py), by outcome: "
            "used, stale (the session changed elsewhere), refused (the turn never started)",
            ["outcome"],
            registry=r,
        )
        self.early_wasted_tokens = Counter(
            "korero_early_wasted_prompt_tokens",
            "Estimated prompt tokens of early upstream requests that were closed unused",
            registry=r,
        )
        self.handoffs = Counter(
            "korero_handoffs",
            "Conversations handed to human agents, by trigger",
            ["trigger"],
            registry=r,
        )
        self.handoff_wait = Histogram(
            "korero_handoff_wait_seconds",
            "From a handoff request to the agent joining",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.agent_desks = Gauge("korero_agent_desks", "Open agent desk streams", registry=r)
        self.webhook_deliveries = Counter(
            "korero_webhook_deliveries",
            "Webhook delivery attempts by result (delivered, retried, dead_lettered)",
            ["result"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "korero_upstream_errors", "Failed LLM calls by reason", ["reason"], registry=r
        )
        self.postgres_outbox_backlog = Gauge(
            "korero_postgres_outbox_backlog",
            "Outbox entries (messages, session changes) not yet written to PostgreSQL",
            registry=r,
        )
        self.postgres_errors = Counter(
            "korero_postgres_errors", "Failed PostgreSQL calls by operation", ["op"], registry=r
        )
        self.postgres_commit_wait = Histogram(
            "korero_postgres_commit_wait_seconds",
            "How long `done` waited for the turn's PostgreSQL commit",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def turn_ended(
        self,
        *,
        tenant: str,
        model: str,
        outcome: str,
        reason: str,
        duration: float,
        time_to_first_token: float | None,
        input_tokens: int,
        output_tokens: int,
    ) -> None:
        """Record a finished turn (called once per turn by the engine)."""
        self.turns.labels(outcome, reason).inc()
        self.turn_duration.observe(duration)
        if time_to_first_token is not None:
            self.time_to_first_token.observe(time_to_first_token)
        if input_tokens or output_tokens:
            self.llm_tokens.labels(tenant, model, "input").inc(input_tokens)
            self.llm_tokens.labels(tenant, model, "output").inc(output_tokens)
            cost = input_tokens * self._price_in + output_tokens * self._price_out
            self.llm_cost.labels(tenant, model).inc(cost)
        if reason.startswith(("UPSTREAM_", "FIRST_TOKEN")):
            self.upstream_errors.labels(reason).inc()
        elif reason.startswith("STORE_"):
            self.redis_errors.labels(reason).inc()

    def view(self) -> CollectorRegistry:
        """The registry to read: this process's, or the sum over every worker's files."""
        if self.multiprocess_dir is None:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        return merged

    def render(self) -> bytes:
        return generate_latest(self.view())


async def serve_metrics(metrics: Metrics, listen: str | None) -> web.AppRunner | None:
    """Serve `/metrics` on `listen` (HOST:PORT; port 0 picks one); None when off (None).

    Workers share the port (SO_REUSEPORT); a single process does not, so two
    servers started by mistake on one port fail instead of splitting scrapes.
    """
    if listen is None:
        return None
    host, _, port = listen.rpartition(":")

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    shared = metrics.multiprocess_dir is not None
    site = web.TCPSite(runner, host or "127.0.0.1", int(port), reuse_port=shared or None)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a metrics runner listens on."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    raise RuntimeError("metrics server has no socket")


def build_tracer_provider(settings: ObservabilitySettings) -> TracerProvider | None:
    """A tracer provider exporting as configured; None when tracing is off."""
    if settings.trace_exporter == "none":
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    exporter: Any
    if settings.trace_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    else:
        exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


@contextmanager
def span(tracer: trace.Tracer, name: str, **attributes: Any) -> Iterator[trace.Span]:
    """A child span of the current one, with attributes."""
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current

"""Wiring: build the gRPC server from settings, run it, drain it on SIGTERM.

No conversation logic lives here; it only connects the pieces. (Longer than
400 lines: one builder per part — gate, engine, gRPC server, handoff, history,
ops — each short; `start` calls them in order and `shutdown` undoes them.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from korero.agent.v1 import agent_pb2, agent_pb2_grpc
from korero.chat.v1 import chat_pb2
from korero.server.context.assembly import KnowledgeAssembler, LLMSummarizer
from korero.server.context.cache import ResponseCache
from korero.server.context.knowledge import KnowledgeBase, KnowledgeStore
from korero.server.context.router import RuleRouter
from korero.server.conversation.engine import ConversationEngine
from korero.server.conversation.tools_loop import ToolLoop
from korero.server.handoff.relay import RelayHub
from korero.server.handoff.service import HandoffService
from korero.server.handoff.store import HandoffStore
from korero.server.handoff.webhooks import WebhookDispatcher, WebhookOutbox
from korero.server.llm.provider import LLMProvider, OpenAIProvider
from korero.server.ops import OpsStats
from korero.server.policy.api_keys import ApiKeyStore
from korero.server.policy.gate import CallGate
from korero.server.policy.identity import AnonymousAuthenticator, Authenticator
from korero.server.policy.pacing import SessionOpenPacer
from korero.server.policy.ratelimit import RateLimiter
from korero.server.policy.throttle import AuthFailureThrottle
from korero.server.report.recorder import Recorder
from korero.server.settings import Settings
from korero.server.storage.connection import connect_subscriber
from korero.server.storage.history import HistoryStore
from korero.server.storage.outbox import OutboxWriter
from korero.server.storage.sessions import SessionStore
from korero.server.telemetry import Metrics, bound_port, build_tracer_provider, serve_metrics
from korero.server.tools import ToolExecutor, ToolRegistry, ToolResultCache
from korero.server.transport.agent_service import AgentDeskServicer
from korero.server.transport.chat_session import StreamRules
from korero.server.transport.grpc_service import ChatServicer
from korero.server.transport.interceptors import GateInterceptor
from korero.server.transport.lifecycle import Lifecycle
from korero.server.transport.tls import describe as describe_tls
from korero.server.transport.tls import grpc_server_credentials, server_ssl_context
from korero.server.transport.websocket import WebSocketServer

__all__ = ["KoreroServer", "run"]

log = logging.getLogger(__name__)

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentDeskService"].full_name
HISTORY_HEALTH = "korero.history"
"""Health service name that is NOT_SERVING while PostgreSQL writes fail (the chat stays SERVING)."""

_PENDING_CALLS = 50_000  # calls grpc-core holds for the server before it refuses any
_PENDING_SECONDS = 120  # how long one of them may wait there

_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 1),
    # Generous: on a saturated machine a late ping ack must not drop every
    # stream of a connection (seen at 1,000 streams with 30 s / 10 s).
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_concurrent_streams", 100_000),
    # Calls that arrive faster than the Python server takes them wait in grpc-core's
    # pending queue, which by default refuses at random past 1,000 and always past 3,000
    # ("Too many pending requests", RESOURCE_EXHAUSTED without RetryInfo) — and a client
    # still writing its `start` sees INTERNAL "Internal error from Core" instead. 10,000
    # Chat streams opened at once lost 5,176 that way; with these bounds all opened.
    # Session opens past what Redis takes are paced in Python (policy/pacing.py), where
    # a refusal carries RetryInfo.
    ("grpc.server.max_pending_requests", _PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", _PENDING_CALLS),
    # A call still waiting there after this long is cancelled (CANCELLED, no RetryInfo):
    # 30 s by default, which a burst of 10,000 opens at once outlasted on 2 busy cores
    # (2,716 CANCELLED after 33-35 s in the `open` scenario).
    ("grpc.server_max_unrequested_time_in_server", _PENDING_SECONDS),
]


@dataclass
class KoreroServer:
    """A running Kōrero gRPC server and the parts it owns."""

    server: grpc.aio.Server
    port: int
    engine: ConversationEngine
    lifecycle: Lifecycle
    health: health_aio.HealthServicer
    store: SessionStore
    llm: LLMProvider
    settings: Settings
    authenticator: Authenticator
    metrics: Metrics
    metrics_runner: web.AppRunner | None = None
    tracer_provider: TracerProvider | None = None
    websocket: WebSocketServer | None = None
    tool_executor: ToolExecutor | None = None
    history: HistoryStore | None = None
    outbox: OutboxWriter | None = None
    ops: OpsStats | None = None
    handoff: HandoffService | None = None
    webhooks: WebhookDispatcher | None = None
    recorder: Recorder | None = None

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_runner is None else bound_port(self.metrics_runner)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        store: SessionStore | None = None,
        llm: LLMProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        metrics: Metrics | None = None,
    ) -> KoreroServer:
        """Build everything from settings (or injected parts) and start listening."""
        durable = settings.postgres.url is not None
        store = store or SessionStore.connect(settings.redis, settings.engine, outbox=durable)
        llm = llm or OpenAIProvider(settings.llm)
        metrics = metrics or Metrics(settings.observability)
        health = health_aio.HealthServicer()
        history, outbox = await _durability(settings, store, metrics, health)
        provider, tracer, interceptors = _build_tracing(settings, store, tracer_provider)
        gate, limiter, authenticator = _build_gate(settings, store, metrics)
        if gate.checks_anything:
            interceptors.append(GateInterceptor(gate))
        tool_executor = _build_tool_executor(settings, store)
        recorder = _build_recorder(settings)
        handoff, webhooks = await _build_handoff(settings, store, metrics, recorder, outbox)
        engine = _build_engine(
            settings, store, llm, limiter, metrics, tracer, tool_executor, handoff
        )
        engine.attach_history(history, outbox)
        lifecycle = Lifecycle()
        server, port, services = _build_grpc_server(
            settings, engine, lifecycle, health, metrics, interceptors, handoff
        )
        websocket, ops = await _start_websocket(settings, engine, gate, metrics, handoff)
        await server.start()
        for service in ("", *services):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if outbox is not None:
            await health.set(HISTORY_HEALTH, health_pb2.HealthCheckResponse.SERVING)
            outbox.start()
        return cls(
            server=server,
            port=port,
            engine=engine,
            lifecycle=lifecycle,
            health=health,
            store=store,
            llm=llm,
            settings=settings,
            authenticator=authenticator,
            metrics=metrics,
            metrics_runner=await _serve_metrics(settings, metrics),
            tracer_provider=provider,
            websocket=websocket,
            tool_executor=tool_executor,
            history=history,
            outbox=outbox,
            ops=ops,
            handoff=handoff,
            webhooks=webhooks,
            recorder=recorder,
        )

    @property
    def address(self) -> str:
        host = self.settings.server.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING at once, refuse new streams, let turns finish, then stop."""
        grace = self.settings.server.shutdown_grace if grace is None else grace
        log.info("event=draining grace=%.1f open_streams=%d", grace, self.lifecycle.open_streams)
        await self.health.enter_graceful_shutdown()
        self.lifecycle.begin_drain()
        if self.websocket is not None:
            self.websocket.begin_drain()
        await self.engine.drain(grace)
        if self.websocket is not None:
            await self.websocket.close()
        if self.ops is not None:
            await self.ops.close()
        await self.server.stop(grace=1.0)
        if self.webhooks is not None:
            await self.webhooks.close()
        if self.handoff is not None:
            await self.handoff.close()
        if self.recorder is not None:
            await self.recorder.close()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        await self.llm.aclose()
        if self.tool_executor is not None:
            await self.tool_executor.close()
        if self.outbox is not None:
            await self.outbox.stop()  # a last sweep: a clean stop leaves no backlog behind
        if self.history is not None:
            await self.history.close()
        await self.store.close()
        log.info("event=stopped")


def _build_tracing(
    settings: Settings, store: SessionStore, injected: TracerProvider | None
) -> tuple[TracerProvider | None, trace.Tracer, list[grpc.aio.ServerInterceptor]]:
    """The tracer provider (None: tracing off), the engine's tracer, the tracing interceptor."""
    provider = injected or build_tracer_provider(settings.observability)
    tracer = (provider or trace.get_tracer_provider()).get_tracer("korero.server")
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if provider is not None:
        # Imported only when tracing is on, like the token verifier: what a server
        # does not use should not sit in its memory (bench/README.md, "Memory").
        from opentelemetry.instrumentation.grpc import aio_server_interceptor  # noqa: PLC0415
        from opentelemetry.instrumentation.redis import RedisInstrumentor  # noqa: PLC0415

        RedisInstrumentor.instrument_client(store.redis, tracer_provider=provider)
        interceptors.append(aio_server_interceptor(tracer_provider=provider))  # type: ignore[no-untyped-call]
    return provider, tracer, interceptors


def _build_recorder(settings: Settings) -> Recorder | None:
    """The handoff report's PostgreSQL writer (running), when PostgreSQL is on."""
    if settings.postgres.url is None:
        return None
    recorder = Recorder(
        settings.postgres.url,
        pool_size=max(1, settings.postgres.pool_size // 4),
        timeout=settings.postgres.timeout,
    )
    recorder.start()
    return recorder


def _build_open_pacer(settings: Settings, metrics: Metrics) -> SessionOpenPacer:
    """One per engine, so one per process: every transport opens its sessions through the
    engine (policy/pacing.py)."""
    return SessionOpenPacer(
        in_flight=settings.server.opens_in_flight,
        queue=settings.server.opens_queue,
        max_wait=settings.redis.timeout,  # what an open would have waited on the pool
        on_refused=lambda why: metrics.session_opens_refused.labels(why).inc(),
    )


async def _start_websocket(
    settings: Settings,
    engine: ConversationEngine,
    gate: CallGate,
    metrics: Metrics,
    handoff: HandoffService | None,
) -> tuple[WebSocketServer | None, OpsStats | None]:
    """The WebSocket listener (and the ops page it serves), when one is configured."""
    if settings.server.ws_listen is None:
        return None, None
    ops = None
    if settings.observability.ops_token is not None:
        ops = OpsStats(metrics, settings.observability.ops_token)
    websocket = WebSocketServer(
        engine=engine,
        gate=gate,
        listen=settings.server.ws_listen,
        rules=StreamRules.from_settings(settings.server),
        web_root=settings.server.web_root,
        ssl_context=server_ssl_context(settings.tls),
        routes=ops.routes() if ops is not None else (),
        handoff=handoff,
    )
    await websocket.start()
    if ops is not None:
        await ops.start()
    return websocket, ops


async def _serve_metrics(settings: Settings, metrics: Metrics) -> web.AppRunner | None:
    """The Prometheus endpoint; a server that cannot bind it still serves chats."""
    try:
        return await serve_metrics(metrics, settings.observability.metrics_listen)
    except OSError as exc:  # metrics are not worth refusing to serve for
        log.error(
            "event=metrics_listen_failed listen=%s error=%s",
            settings.observability.metrics_listen,
            exc,
        )
        return None


def _build_gate(
    settings: Settings, store: SessionStore, metrics: Metrics
) -> tuple[CallGate, RateLimiter | None, Authenticator]:
    """The call policy: who may call (auth) and how much (limits)."""
    authenticator: Authenticator = AnonymousAuthenticator(settings.engine.tenant)
    throttle = throttle_key = None
    if settings.auth.mode == "on":
        from korero.server.policy.tokens import TokenAuthenticator  # noqa: PLC0415 - PyJWT + crypto

        tokens = TokenAuthenticator(settings.auth, ApiKeyStore(store.redis))
        authenticator, throttle_key = tokens, tokens.throttle_key
        throttle = AuthFailureThrottle(
            per_peer=settings.auth.failures_per_peer,
            per_tenant=settings.auth.failures_per_tenant,
            on_throttled=lambda scope: metrics.auth_throttled.labels(scope).inc(),
        )
    limiter = None
    if settings.limits.enabled:
        limiter = RateLimiter(
            store.redis,
            settings.limits,
            on_fallback=metrics.rate_limit_fallbacks.inc,
            on_reject=lambda limit: metrics.rate_limit_rejections.labels(limit).inc(),
        )
    gate = CallGate(
        authenticator=authenticator,
        open_methods=settings.auth.open_methods,
        default_tenant=settings.engine.tenant,
        limiter=limiter,
        authenticates=settings.auth.mode == "on",
        throttle=throttle,
        throttle_key=throttle_key,
    )
    return gate, limiter, authenticator


async def _durability(
    settings: Settings, store: SessionStore, metrics: Metrics, health: health_aio.HealthServicer
) -> tuple[HistoryStore | None, OutboxWriter | None]:
    """PostgreSQL and the outbox writer that feeds it, when KORERO_POSTGRES_URL is set."""
    if settings.postgres.url is None:
        return None, None
    history = await HistoryStore.connect(settings.postgres)

    def on_state(up: bool) -> None:
        serving = health_pb2.HealthCheckResponse
        status = serving.SERVING if up else serving.NOT_SERVING
        asyncio.get_running_loop().create_task(health.set(HISTORY_HEALTH, status))

    outbox = OutboxWriter(
        store.redis,
        history,
        drain_interval=settings.postgres.drain_interval,
        probe_interval=settings.postgres.probe_interval,
        commit_wait=settings.postgres.commit_wait,
        on_backlog=metrics.postgres_outbox_backlog.set,
        on_error=lambda op: metrics.postgres_errors.labels(op).inc(),
        on_commit_wait=metrics.postgres_commit_wait.observe,
        on_state=on_state,
    )
    return history, outbox


def _build_tool_executor(settings: Settings, store: SessionStore) -> ToolExecutor:
    """The tool executor, with the tool result cache unless it is off."""
    ttl = settings.tools.result_cache_seconds
    cache = ToolResultCache(store.redis, ttl) if ttl > 0 else None
    return ToolExecutor(result_cache=cache)


def _build_engine(
    settings: Settings,
    store: SessionStore,
    llm: LLMProvider,
    limiter: RateLimiter | None,
    metrics: Metrics,
    tracer: trace.Tracer,
    tool_executor: ToolExecutor,
    handoff: HandoffService | None,
) -> ConversationEngine:
    """The conversation engine with its context assembly, cache, knowledge base and tools."""
    kb_store = KnowledgeStore(store.redis)
    assembler = KnowledgeAssembler(
        system_prompt=settings.engine.system_prompt,
        prompt_version=settings.engine.prompt_version,
        prompt=settings.prompt,
        kb=KnowledgeBase(kb_store, settings.knowledge),
        summarizer=LLMSummarizer(
            llm=llm,
            model=settings.llm.model,
            max_tokens=settings.prompt.summary_tokens,
            timeout=settings.llm.first_token_timeout,
        ),
    )
    return ConversationEngine(
        store=store,
        llm=llm,
        assembler=assembler,
        settings=settings.engine,
        llm_settings=settings.llm,
        snippet_chars=settings.knowledge.snippet_chars,
        limiter=limiter,
        metrics=metrics,
        tracer=tracer,
        router=RuleRouter(),
        cache=ResponseCache(store.redis, settings.cache) if settings.cache.enabled else None,
        knowledge=kb_store,
        tool_loop=ToolLoop(
            ToolRegistry(store.redis),
            tool_executor,
            max_rounds=settings.tools.max_rounds,
            cache_seconds=settings.tools.cache_seconds,
        ),
        handoff=handoff,
        opens=_build_open_pacer(settings, metrics),
    )


def _build_grpc_server(
    settings: Settings,
    engine: ConversationEngine,
    lifecycle: Lifecycle,
    health: health_aio.HealthServicer,
    metrics: Metrics,
    interceptors: list[grpc.aio.ServerInterceptor],
    handoff: HandoffService | None,
) -> tuple[grpc.aio.Server, int, list[str]]:
    """ChatService (and the agent desk), health and reflection, not started yet.

    Returns the server, its port and the names of the services it serves.
    """
    options = list(_SERVER_OPTIONS)
    if settings.server.max_connection_age is not None:
        # GOAWAY after this age: new calls reconnect (and may be balanced elsewhere);
        # open streams are not cut (no max_connection_age_grace).
        options.append(
            ("grpc.max_connection_age_ms", int(settings.server.max_connection_age * 1000))
        )
    server = grpc.aio.server(interceptors=interceptors, options=options)
    ChatServicer(
        engine=engine,
        lifecycle=lifecycle,
        metrics=metrics,
        rules=StreamRules.from_settings(settings.server),
        default_tenant=settings.engine.tenant,
    ).add_to_server(server)
    services = [CHAT_SERVICE]
    if handoff is not None:
        agent_pb2_grpc.add_AgentDeskServiceServicer_to_server(
            AgentDeskServicer(
                service=handoff,
                lifecycle=lifecycle,
                metrics=metrics,
                heartbeat_interval=settings.server.heartbeat_interval,
                first_frame_timeout=settings.server.first_frame_timeout,
                default_tenant=settings.engine.tenant,
            ),
            server,
        )
        services.append(AGENT_SERVICE)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    credentials = grpc_server_credentials(settings.tls)
    try:
        if credentials is not None:
            port = server.add_secure_port(settings.server.listen, credentials)
        else:
            port = server.add_insecure_port(settings.server.listen)
    except RuntimeError as exc:  # grpcio's way of saying the bind failed
        raise OSError(f"cannot listen on {settings.server.listen}: {exc}") from None
    return server, port, services


async def _build_handoff(
    settings: Settings,
    store: SessionStore,
    metrics: Metrics,
    recorder: Recorder | None,
    outbox: OutboxWriter | None,
) -> tuple[HandoffService | None, WebhookDispatcher]:
    """The handoff service (None when off) and the webhook dispatcher, started."""
    handoff = None
    if settings.handoff.enabled:
        handoff = HandoffService(
            store=HandoffStore(
                store.redis,
                ttl_seconds=settings.engine.session_ttl,
                relay_max=settings.handoff.relay_log_max,
                outbox=store.outbox,  # relayed messages reach PostgreSQL as the bot's turns do
                on_outbox=outbox.notify if outbox is not None else lambda: None,
            ),
            # Its own connection, without the pool's read timeout: it idles by design.
            hub=RelayHub(connect_subscriber(settings.redis)),
            settings=settings.handoff,
            outbox=WebhookOutbox(settings.webhooks),
            metrics=metrics,
            recorder=recorder,
        )
        await handoff.start()
    webhooks = WebhookDispatcher(
        store.redis,
        settings.webhooks,
        on_result=lambda result: metrics.webhook_deliveries.labels(result).inc(),
    )
    webhooks.start()
    if handoff is not None:
        for tenant in settings.webhooks.targets:
            handoff.hub.watch(tenant, None, functools.partial(webhooks.wake, tenant))
    return handoff, webhooks


async def run(
    settings: Settings,
    *,
    multiprocess_dir: Path | None = None,
    on_serving: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain.

    A worker of `korero serve --workers N` passes the supervisor's metrics
    directory (values summed over workers) and a callback saying it is serving.
    """
    metrics = Metrics(settings.observability, multiprocess_dir=multiprocess_dir)
    app = await KoreroServer.start(settings, metrics=metrics)
    log.info(
        "event=serving address=%s tls=%s redis=%s llm=%s model=%s auth=%s metrics_port=%s",
        app.address,
        describe_tls(settings.tls),
        _redact(settings.redis.url),
        settings.llm.base_url,
        settings.llm.model,
        settings.auth.mode,
        app.metrics_port,
    )
    if app.websocket is not None:
        log.info(
            "event=ws_serving address=%s paths=/ws/chat,/ws/agent ops=%s",
            app.websocket.address,
            "on" if app.ops is not None else "off",
        )
    host = settings.server.listen.rsplit(":", 1)[0].strip("[]")
    if settings.auth.mode == "off" and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "event=auth_off_on_network address=%s hint=set KORERO_AUTH=on before exposing it",
            app.address,
        )
    try:
        await app.store.ping()
    except Exception as exc:
        log.warning("event=redis_unreachable error=%s", type(exc).__name__)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_serving is not None:
        on_serving()
    await stop.wait()
    await app.shutdown()


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest

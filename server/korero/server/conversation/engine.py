"""The conversation engine: sessions and turns, independent of any transport.

A transport (the gRPC servicer, later the WebSocket adapter) calls
`open_session` once per stream and `start_turn` per user message, and
receives `korero.chat.v1.Event` messages through a sink callable. The engine
owns the turn lifecycle: every turn it starts publishes exactly one terminal
event (`done` or `error`), whatever fails, and persists its outcome before
publishing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace

from korero.chat.v1 import chat_pb2 as pb
from korero.server.context.assembly import AssembledContext, ContextAssembler, ContextRequest
from korero.server.context.cache import CachedAnswer, CacheLookup, CacheProbe, ResponseCache
from korero.server.context.knowledge import Source
from korero.server.context.router import IntentRouter, RouteDecision, RuleRouter
from korero.server.conversation.coalesce import DeltaCoalescer
from korero.server.errors import InvalidArgumentError, KoreroError, ShuttingDownError
from korero.server.llm.provider import (
    LLMProvider,
    LLMRequest,
    TokenUsage,
    display_model,
    estimate_tokens,
)
from korero.server.policy.ratelimit import Admission, RateLimiter
from korero.server.settings import EngineSettings, KnowledgeSettings, LLMSettings
from korero.server.storage.records import SessionRecord, StoredMessage, TurnBegin, TurnRecord
from korero.server.storage.scripts import ScriptCall
from korero.server.storage.sessions import SessionStore
from korero.server.telemetry import Metrics

__all__ = [
    "ConversationEngine",
    "EventSink",
    "Turn",
    "message_to_pb",
    "session_to_pb",
    "validate_metadata",
]

log = logging.getLogger(__name__)

EventSink = Callable[[pb.Event], None]
"""Receives a turn's events in order; must not block."""

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_CLIENT_MESSAGE_ID = 128
_MAX_METADATA_VALUE = 256
_MAX_ATTRIBUTES = 32
MAX_CITATIONS = 3
_REPLAY_EVENTS = 4 + MAX_CITATIONS  # turn started, one text delta, citations, usage, done
_CACHED_DELTA_CHARS = 160  # a cached answer is replayed in pieces of about this size
_JOIN_POLL = 0.05

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


def validate_session_id(session_id: str) -> None:
    if not _SESSION_ID.match(session_id):
        raise InvalidArgumentError(
            "SESSION_ID_INVALID", "session_id must be 1-64 characters of A-Z a-z 0-9 _ -"
        )


def validate_metadata(metadata: pb.SessionMetadata) -> dict[str, Any]:
    """The metadata as a plain dict with only the fields that are set; bounded in size."""
    out: dict[str, Any] = {}
    for name in ("customer_name", "booking_reference", "locale"):
        value = getattr(metadata, name)
        if len(value) > _MAX_METADATA_VALUE:
            raise InvalidArgumentError(
                "METADATA_TOO_LARGE", f"{name} is longer than {_MAX_METADATA_VALUE} characters"
            )
        if value:
            out[name] = value
    if len(metadata.attributes) > _MAX_ATTRIBUTES:
        raise InvalidArgumentError(
            "METADATA_TOO_LARGE", f"more than {_MAX_ATTRIBUTES} metadata attributes"
        )
    for key, value in metadata.attributes.items():
        if len(key) > 64 or len(value) > _MAX_METADATA_VALUE:
            raise InvalidArgumentError(
                "METADATA_TOO_LARGE", f"metadata attribute {key[:64]!r} is too long"
            )
    if metadata.attributes:
        out["attributes"] = dict(metadata.attributes)
    return out


def _validate_message(message: pb.UserMessage, max_bytes: int) -> None:
    cmid = message.client_message_id
    if not cmid:
        raise InvalidArgumentError(
            "CLIENT_MESSAGE_ID_REQUIRED", "client_message_id is required (an idempotency key)"
        )
    if len(cmid) > _MAX_CLIENT_MESSAGE_ID:
        raise InvalidArgumentError(
            "CLIENT_MESSAGE_ID_INVALID",
            f"client_message_id is longer than {_MAX_CLIENT_MESSAGE_ID} characters",
        )
    if not message.text.strip():
        raise InvalidArgumentError("MESSAGE_EMPTY", "message text is empty")
    size = len(message.text.encode())
    if size > max_bytes:
        raise InvalidArgumentError(
            "MESSAGE_TOO_LARGE", f"message is {size} bytes; the limit is {max_bytes}"
        )


_CITED = re.compile(r"\[Source:\s*([^,\]]+),\s*Section\s*([^\]]+)\]")


def _snippet(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return flat[:limit].rsplit(" ", 1)[0] + "…"


def _replay_pieces(text: str, emit: Callable[[str], None], answer: list[str]) -> None:
    """Send a known answer at once, as a stream of deltas cut at word boundaries."""
    start = 0
    while start < len(text):
        end = min(len(text), start + _CACHED_DELTA_CHARS)
        if end < len(text):
            space = text.rfind(" ", start + 1, end)
            end = space if space > start else end
        piece = text[start:end]
        answer.append(piece)
        emit(piece)
        start = end


def _announce(turn: Turn, model: str) -> None:
    """The first events of a turn: turn started, then the caller's rate-limit budget."""
    turn.publish(
        turn_started=pb.TurnStarted(
            client_message_id=turn.client_message_id,
            model=model,
            intent=turn.intent,
            trace_id=_trace_id(turn),
        )
    )
    if turn.admission is not None:
        turn.publish(rate_limit=_rate_limit_status(turn.admission))


def _trace_id(turn: Turn) -> str:
    ctx = turn.span.get_span_context()
    return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else ""


def _rate_limit_status(admission: Admission) -> pb.RateLimitStatus:
    return pb.RateLimitStatus(
        remaining_requests=admission.remaining_requests,
        remaining_tokens=admission.remaining_tokens,
        reset_after=_dur(admission.reset_after),
        limit=admission.closest,
    )


def _llm_span_end(
    span: trace.Span, timings: _Timings, usage: TokenUsage | None, finish: str | None
) -> None:
    if timings.first_token is not None:
        span.set_attribute(
            "gen_ai.response.time_to_first_token", timings.first_token - timings.started
        )
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
    if finish:
        span.set_attribute("gen_ai.response.finish_reasons", [finish])


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    return d


def metadata_to_pb(meta: Mapping[str, Any]) -> pb.SessionMetadata:
    """Stored metadata as the API's `SessionMetadata`."""
    return pb.SessionMetadata(
        customer_name=meta.get("customer_name", ""),
        booking_reference=meta.get("booking_reference", ""),
        locale=meta.get("locale", ""),
        attributes=meta.get("attributes") or {},
    )


def session_to_pb(record: SessionRecord) -> pb.Session:
    """A stored session as the API's `Session`."""
    return pb.Session(
        session_id=record.session_id,
        metadata=metadata_to_pb(record.metadata),
        create_time=_ts(record.created_at),
        update_time=_ts(record.updated_at),
        last_seq=record.last_seq,
        turn_count=record.turn_count,
        message_count=record.message_count,
    )


def message_to_pb(message: StoredMessage) -> pb.Message:
    """A stored message as the API's `Message`."""
    return pb.Message(
        role=pb.ROLE_USER if message.role == "user" else pb.ROLE_ASSISTANT,
        text=message.text,
        turn_id=message.turn_id,
        client_message_id=message.client_message_id,
        create_time=_ts(message.created_at),
    )


def usage_to_pb(usage: TokenUsage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        estimated=usage.estimated,
    )


def error_event_body(error: KoreroError, client_message_id: str = "") -> pb.TurnError:
    """A `KoreroError` as the `error` event body."""
    body = pb.TurnError(
        code=error.code.value[0],
        reason=error.reason,
        message=error.message,
        retryable=error.retryable,
        client_message_id=client_message_id,
    )
    if error.retry_after is not None:
        body.retry_after.CopyFrom(_dur(error.retry_after))
    return body


@dataclass
class _Timings:
    started: float
    session_load: float = 0.0
    context_assembly: float = 0.0
    first_token: float | None = None
    llm_started: float | None = None
    llm_ended: float | None = None

    def to_pb(self, now: float) -> pb.StageTimings:
        t = pb.StageTimings(
            session_load=_dur(self.session_load),
            context_assembly=_dur(self.context_assembly),
            total=_dur(now - self.started),
        )
        if self.first_token is not None:
            t.time_to_first_token.CopyFrom(_dur(self.first_token - self.started))
        if self.llm_started is not None:
            t.llm.CopyFrom(_dur((self.llm_ended or now) - self.llm_started))
        return t


@dataclass
class Turn:
    """One turn in flight. Publishes its events to every subscribed sink.

    Late subscribers (an idempotent retry joining the turn) first receive the
    events published so far, then the rest live.
    """

    tenant: str
    session_id: str
    turn_id: str
    client_message_id: str
    seq: int
    events: list[pb.Event] = field(default_factory=list)
    sinks: list[EventSink] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    cancel_reason: KoreroError | None = None
    cancelled_by_client: bool = False
    finishing: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    route: RouteDecision | None = None
    """The router's decision for the message (intent, confidence, reasons): for spans too."""
    cache_probe: CacheProbe | None = None
    lookup: CacheLookup | None = None
    """What the response cache said when the turn began (and the KB version)."""

    admission: Admission | None = None
    span: trace.Span = trace.INVALID_SPAN
    timings: _Timings | None = None
    outcome: str = "error"
    reason: str = ""
    usage: TokenUsage | None = None

    @property
    def intent(self) -> str:
        return self.route.intent if self.route is not None else ""

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    def subscribe(self, sink: EventSink) -> None:
        for event in self.events:
            sink(event)
        if not self.done:
            self.sinks.append(sink)

    def unsubscribe(self, sink: EventSink) -> None:
        with contextlib.suppress(ValueError):
            self.sinks.remove(sink)

    def publish(self, **kind: Any) -> pb.Event:
        self.seq += 1
        event = pb.Event(session_id=self.session_id, turn_id=self.turn_id, seq=self.seq, **kind)
        self.events.append(event)
        for sink in tuple(self.sinks):
            sink(event)
        return event

    def cancel(self, *, by_client: bool = True, error: KoreroError | None = None) -> None:
        """Stop the turn: by the client (terminal `done` CANCELLED) or with an error."""
        if self.done or self.finishing or self.task is None:
            return  # once the outcome is being persisted, the turn ends as it is
        if self.cancel_reason is None and not self.cancelled_by_client:
            self.cancelled_by_client = by_client and error is None
            self.cancel_reason = error
        self.task.cancel()

    async def wait(self) -> None:
        await self.finished.wait()


class ConversationEngine:
    """Sessions and turns over a store, an LLM provider and a context assembler."""

    def __init__(
        self,
        store: SessionStore,
        llm: LLMProvider,
        assembler: ContextAssembler,
        engine_settings: EngineSettings,
        llm_settings: LLMSettings,
        clock: Callable[[], float] = time.monotonic,
        *,
        router: IntentRouter | None = None,
        cache: ResponseCache | None = None,
        knowledge_settings: KnowledgeSettings | None = None,
        limiter: RateLimiter | None = None,
        metrics: Metrics | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._store = store
        self._llm = llm
        self._assembler = assembler
        self._settings = engine_settings
        self._llm_settings = llm_settings
        self._clock = clock
        self._turns: dict[tuple[str, str, str], Turn] = {}
        self._router: IntentRouter = router or RuleRouter()
        self._cache = cache
        self._knowledge = knowledge_settings or KnowledgeSettings()
        self._limiter = limiter
        self._metrics = metrics
        self._tracer = tracer or trace.get_tracer(__name__)
        # Reserved per message before the history is known; settled to real usage.
        self._base_reservation = estimate_tokens(engine_settings.system_prompt) + (
            llm_settings.max_tokens
        )

    @property
    def cache(self) -> ResponseCache | None:
        return self._cache

    @property
    def limiter(self) -> RateLimiter | None:
        return self._limiter

    @property
    def store(self) -> SessionStore:
        return self._store

    @property
    def active_turns(self) -> int:
        return len(self._turns)

    # Sessions -----------------------------------------------------------------

    async def open_session(
        self, tenant: str, session_id: str, metadata: pb.SessionMetadata
    ) -> pb.Event:
        """Start (empty `session_id`) or resume a session; returns the session-started event."""
        meta = validate_metadata(metadata)
        if session_id:
            validate_session_id(session_id)
            record = await self._store.resume_session(tenant, session_id, meta)
        else:
            record = await self._store.create_session(tenant, meta)
        return pb.Event(
            session_id=record.session_id,
            seq=record.last_seq,
            session_started=pb.SessionStarted(
                resumed=bool(session_id), session=session_to_pb(record)
            ),
        )

    async def get_session(self, tenant: str, session_id: str) -> pb.Session:
        validate_session_id(session_id)
        return session_to_pb(await self._store.get_session(tenant, session_id))

    async def list_messages(
        self, tenant: str, session_id: str, page_size: int, page_token: str
    ) -> pb.ListMessagesResponse:
        validate_session_id(session_id)
        if page_size < 0:
            raise InvalidArgumentError("PAGE_SIZE_INVALID", "page_size must not be negative")
        size = min(page_size or 50, 500)
        messages, token = await self._store.list_messages(tenant, session_id, size, page_token)
        return pb.ListMessagesResponse(
            messages=[message_to_pb(m) for m in messages], next_page_token=token
        )

    # Turns --------------------------------------------------------------------

    async def start_turn(
        self,
        tenant: str,
        session_id: str,
        message: pb.UserMessage,
        sink: EventSink,
        deadline: float | None = None,
    ) -> Turn:
        """Begin a turn for `message` and subscribe `sink` to its events.

        Raises `InvalidArgumentError` for bad input or when another turn of the
        session is in flight, and `StoreUnavailableError` when the session
        cannot be loaded; in those cases no turn exists and nothing was stored.
        `deadline` is on the engine's clock (the client's gRPC deadline).
        """
        _validate_message(message, self._settings.max_message_bytes)
        started = self._clock()
        key = (tenant, session_id, message.client_message_id)
        local = self._turns.get(key)
        if local is not None:  # a retry of a message whose turn runs here: join it
            local.subscribe(sink)
            return local
        route = await self._router.route(message.text)
        admission = None
        if self._limiter is not None:
            reservation = self._base_reservation + estimate_tokens(message.text)
            admission = await self._limiter.admit_message(tenant, session_id, reservation)
        turn_span = self._tracer.start_span(
            "korero.turn",
            attributes={
                "korero.tenant": tenant,
                "korero.session_id": session_id,
                "korero.intent": route.intent,
                "korero.intent_confidence": route.confidence,
                "gen_ai.request.model": self._llm_settings.model,
            },
        )
        scope = otel_context.attach(trace.set_span_in_context(turn_span))
        try:
            begin, probe, lookup = await self._begin(tenant, session_id, message, route)
            if begin.status == "busy":
                raise InvalidArgumentError(
                    "TURN_IN_FLIGHT",
                    f"turn {begin.turn_id} is still in flight; wait for it to end or cancel it",
                )
        except KoreroError as error:
            turn_span.set_status(trace.StatusCode.ERROR, error.reason)
            turn_span.end()
            otel_context.detach(scope)
            if admission is not None:
                await self._refund(admission)
            raise
        turn = Turn(tenant, session_id, begin.turn_id, message.client_message_id, begin.seq_base)
        turn.route, turn.cache_probe, turn.lookup = route, probe, lookup
        turn.admission = admission
        turn.span = turn_span
        turn_span.set_attribute("korero.turn_id", turn.turn_id)
        turn.subscribe(sink)
        timings = _Timings(started=started, session_load=self._clock() - started)
        turn.timings = timings
        if begin.status == "started":
            assert begin.session is not None
            body = self._run(turn, begin.session, begin.history, timings, deadline)
        elif begin.status == "replay":
            assert begin.record is not None
            body = self._replay(turn, begin.record, timings)
        else:  # running elsewhere: follow it through the store
            body = self._follow(turn, timings, deadline)
        self._turns[key] = turn
        try:  # the task copies the context now: its spans are children of the turn
            turn.task = asyncio.create_task(
                self._guard(turn, key, body), name=f"turn-{turn.turn_id}"
            )
        finally:
            otel_context.detach(scope)
        return turn

    async def _begin(
        self, tenant: str, session_id: str, message: pb.UserMessage, route: RouteDecision
    ) -> tuple[TurnBegin, CacheProbe | None, CacheLookup | None]:
        """`begin_turn` with the response-cache lookup in the same round trip."""
        probe = None
        if self._cache is not None:
            probe = self._cache.probe(
                tenant,
                message.text,
                route,
                self._assembler.prompt_version,
                self._llm_settings.model,
            )
        with self._tracer.start_as_current_span("korero.session_load"):
            begin = await self._store.begin_turn(
                tenant,
                session_id,
                message.client_message_id,
                message.text,
                _REPLAY_EVENTS,
                intent=route.intent,
                probe=probe.call if probe is not None else None,
            )
        lookup = probe.parse(begin.probe) if probe is not None else None
        if (
            self._cache is not None
            and probe is not None
            and lookup is not None
            and lookup.status == "leader"
            and begin.status != "started"
        ):  # no answer will be generated here: free identical misses at once
            await self._cache.release(probe, lookup.kb_version)
        return begin, probe, lookup

    async def _refund(self, admission: Admission) -> None:
        assert self._limiter is not None
        call = self._limiter.settlement(admission, 0)
        if call is not None:
            with contextlib.suppress(KoreroError):
                await self._store.run(call)

    async def drain(self, grace: float) -> None:
        """Let turns in flight finish for up to `grace` seconds, then end them."""
        turns = list(self._turns.values())
        if turns:
            await asyncio.wait([asyncio.ensure_future(t.wait()) for t in turns], timeout=grace)
        for turn in list(self._turns.values()):
            turn.cancel(error=ShuttingDownError())
        remaining = [asyncio.ensure_future(t.wait()) for t in self._turns.values()]
        if remaining:
            await asyncio.wait(remaining, timeout=5.0)

    async def _guard(self, turn: Turn, key: tuple[str, str, str], body: Any) -> None:
        try:
            await body
        finally:
            self._turns.pop(key, None)
            turn.sinks.clear()
            turn.finished.set()
            self._observe(turn)

    def _observe(self, turn: Turn) -> None:
        span = turn.span
        span.set_attribute("korero.outcome", turn.outcome)
        if turn.reason:
            span.set_attribute("korero.error_reason", turn.reason)
            span.set_status(trace.StatusCode.ERROR, turn.reason)
        span.end()
        if self._metrics is None or turn.timings is None:
            return
        timings = turn.timings
        usage = turn.usage
        self._metrics.turn_ended(
            tenant=turn.tenant,
            model=self._llm_settings.model,
            outcome=turn.outcome,
            reason=turn.reason,
            duration=self._clock() - timings.started,
            time_to_first_token=(
                None if timings.first_token is None else timings.first_token - timings.started
            ),
            input_tokens=0 if usage is None or turn.outcome == "replayed" else usage.input_tokens,
            output_tokens=0 if usage is None or turn.outcome == "replayed" else usage.output_tokens,
        )

    async def _run(  # noqa: PLR0912, PLR0915 - one turn's lifecycle, top to bottom
        self,
        turn: Turn,
        session: SessionRecord,
        history: tuple[StoredMessage, ...],
        timings: _Timings,
        deadline: float | None,
    ) -> None:
        model = self._llm_settings.model
        seq_base = turn.seq
        _announce(turn, display_model(model))
        answer: list[str] = []

        def emit_text(text: str) -> None:
            if timings.first_token is None:
                timings.first_token = self._clock()
            turn.publish(text_delta=pb.TextDelta(text=text))

        coalescer = DeltaCoalescer(
            emit_text, self._settings.coalesce_window_ms / 1000, self._settings.coalesce_max_bytes
        )
        usage: TokenUsage | None = None
        finish: str | None = None
        messages: list[dict[str, str]] = []
        context: AssembledContext | None = None
        cached: CacheLookup | None = None
        try:
            try:
                with self._tracer.start_as_current_span("korero.cache_lookup") as cache_span:
                    cached = await self._cached_answer(turn, deadline)
                    cache_span.set_attribute("korero.cache_hit", cached is not None)
                t = self._clock()
                if cached is None:
                    with self._tracer.start_as_current_span("korero.context_assembly"):
                        context = await self._assembler.assemble(
                            ContextRequest(
                                turn.tenant,
                                session,
                                history,
                                turn.route,
                                turn.lookup.kb_version if turn.lookup is not None else 0,
                            )
                        )
                    messages = context.messages
                timings.context_assembly = self._clock() - t
                limit = self._clock() + self._settings.turn_timeout
                deadline = limit if deadline is None else min(deadline, limit)
                if cached is not None and cached.entry is not None:
                    model = cached.entry.model or model
                    _replay_pieces(cached.entry.answer, emit_text, answer)
                    usage, finish = TokenUsage(0, 0), "stop"
                elif context is not None and context.fallback is not None:
                    _replay_pieces(context.fallback, emit_text, answer)
                    usage, finish = TokenUsage(0, 0), "stop"
                else:
                    usage, finish = await self._traced_generate(
                        messages, model, deadline, coalescer, answer, timings
                    )
                coalescer.flush()
            except asyncio.CancelledError:
                coalescer.flush()
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                if turn.cancel_reason is not None:
                    raise turn.cancel_reason from None
                if not turn.cancelled_by_client:
                    raise
                finish = "cancelled"
            text = "".join(answer)
            if usage is None:
                usage = TokenUsage(
                    sum(estimate_tokens(m["content"]) for m in messages),
                    estimate_tokens(text),
                    estimated=True,
                )
            citations = self._citations(text, context, cached)
            for citation in citations:
                turn.publish(citation=pb.Citation(**citation))
            turn.publish(usage=usage_to_pb(usage))
            turn.usage = usage
            turn.outcome = "cached" if cached is not None else (finish or "stop")
            record = TurnRecord(
                turn.turn_id,
                "cancelled" if finish == "cancelled" else "done",
                answer=text,
                finish_reason=finish or "stop",
                model=model,
                usage={"input": usage.input_tokens, "output": usage.output_tokens},
                citations=tuple(citations),
            )
            store_call = self._cache_store_call(turn, context, record, citations)
            summary = context.summary if context is not None else None
            await self._finish(
                turn,
                record,
                seq_base,
                summary=json.dumps(summary, ensure_ascii=False) if summary else "",
                also=store_call,
            )
            done = pb.TurnDone(
                finish_reason=_FINISH_REASONS.get(finish or "stop", pb.FINISH_REASON_STOP),
                usage=usage_to_pb(usage),
                timings=timings.to_pb(self._clock()),
            )
            if cached is not None:
                done.cached = True
                done.cache_age.CopyFrom(_dur(cached.age))
            turn.publish(done=done)
        except KoreroError as error:
            coalescer.close()
            await self._fail(turn, error, seq_base)
        except Exception as exc:
            coalescer.close()
            log.exception("event=turn_failed turn_id=%s", turn.turn_id)
            await self._fail(
                turn,
                KoreroError(grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error ({exc!r})"),
                seq_base,
            )

    async def _traced_generate(
        self,
        messages: list[dict[str, str]],
        model: str,
        deadline: float,
        coalescer: DeltaCoalescer,
        answer: list[str],
        timings: _Timings,
    ) -> tuple[TokenUsage | None, str | None]:
        """`_generate` inside a GenAI client span."""
        usage: TokenUsage | None = None
        finish: str | None = None
        with self._tracer.start_as_current_span(
            f"chat {model}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": self._llm_settings.max_tokens,
            },
        ) as llm_span:
            try:
                usage, finish = await self._generate(
                    messages, model, deadline, coalescer, answer, timings
                )
            finally:
                _llm_span_end(llm_span, timings, usage, finish)
        return usage, finish

    async def _generate(
        self,
        messages: list[dict[str, str]],
        model: str,
        deadline: float,
        coalescer: DeltaCoalescer,
        answer: list[str],
        timings: _Timings,
    ) -> tuple[TokenUsage | None, str | None]:
        """Stream the answer into `coalescer`; retry failures only before the first token."""
        cfg = self._llm_settings
        request = LLMRequest(messages, model, cfg.max_tokens, cfg.temperature)
        attempt = 0
        while True:
            timings.llm_started = timings.llm_started or self._clock()
            usage: TokenUsage | None = None
            finish: str | None = None
            try:
                async with asyncio.timeout(deadline - self._clock()):
                    stream = self._llm.stream(request)
                    async with contextlib.aclosing(stream):
                        first_by = min(deadline, self._clock() + cfg.first_token_timeout)
                        async with asyncio.timeout(first_by - self._clock()) as first_timeout:
                            async for chunk in stream:
                                if chunk.text or chunk.finish_reason:
                                    first_timeout.reschedule(None)
                                if chunk.text:
                                    answer.append(chunk.text)
                                    coalescer.add(chunk.text)
                                finish = chunk.finish_reason or finish
                                usage = chunk.usage or usage
            except TimeoutError:
                timings.llm_ended = self._clock()
                if not answer and self._clock() < deadline:
                    error = KoreroError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "FIRST_TOKEN_TIMEOUT",
                        f"the assistant sent nothing for {cfg.first_token_timeout:g}s",
                        retryable=True,
                    )
                else:
                    error = KoreroError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "TURN_DEADLINE_EXCEEDED",
                        "the answer did not finish before the deadline",
                        retryable=True,
                    )
                if answer or not self._may_retry(attempt, deadline, 0.0):
                    raise error from None
            except KoreroError as error:
                timings.llm_ended = self._clock()
                backoff = error.retry_after or cfg.retry_backoff * 2**attempt
                if answer or not error.retryable or not self._may_retry(attempt, deadline, backoff):
                    raise
                log.info(
                    "event=llm_retry attempt=%d reason=%s backoff=%.3f",
                    attempt + 1,
                    error.reason,
                    backoff,
                )
                await asyncio.sleep(backoff)
            else:
                timings.llm_ended = self._clock()
                if finish is None:
                    raise KoreroError(
                        grpc.StatusCode.UNAVAILABLE,
                        "UPSTREAM_STREAM_INTERRUPTED",
                        "the assistant's answer was interrupted; please try again",
                        retryable=True,
                    )
                return usage, finish
            attempt += 1

    async def _cached_answer(self, turn: Turn, deadline: float | None) -> CacheLookup | None:
        """The cached answer for this turn, waiting for an identical miss in flight if any."""
        lookup, probe = turn.lookup, turn.cache_probe
        if self._cache is None or lookup is None or probe is None:
            return None
        if lookup.status == "follower":
            limit = self._clock() + self._settings.turn_timeout
            lookup = await self._cache.wait(
                probe, lookup.kb_version, limit if deadline is None else min(deadline, limit)
            )
            turn.lookup = lookup
        self._cache.record(lookup)
        if self._metrics is not None:
            self._metrics.cache_requests.labels("hit" if lookup.status == "hit" else "miss").inc()
        return lookup if lookup.status == "hit" else None

    def _citations(
        self, text: str, context: AssembledContext | None, cached: CacheLookup | None
    ) -> list[dict[str, Any]]:
        """The sources the answer cites (all sources in the prompt if it cites none)."""
        if cached is not None and cached.entry is not None:
            return list(cached.entry.citations)[:MAX_CITATIONS]
        if context is None or not context.sources or not text:
            return []
        cited = {(t.strip(), s.strip()) for t, s in _CITED.findall(text)}
        chosen: list[Source] = [
            src for src in context.sources if (src.chunk.document_title, src.chunk.section) in cited
        ] or list(context.sources)
        limit = self._knowledge.snippet_chars
        return [
            {
                "document_title": src.chunk.document_title,
                "document_id": src.chunk.document_id,
                "section": src.chunk.section,
                "snippet": _snippet(src.chunk.text, limit),
                "score": src.score,
            }
            for src in chosen[:MAX_CITATIONS]
        ]

    def _cache_store_call(
        self,
        turn: Turn,
        context: AssembledContext | None,
        record: TurnRecord,
        citations: list[dict[str, Any]],
    ) -> ScriptCall | None:
        """Store a shareable answer (or free the single-flight lock) with the turn's outcome."""
        lookup, probe = turn.lookup, turn.cache_probe
        if self._cache is None or probe is None or lookup is None or lookup.status != "leader":
            return None
        entry = None
        if (
            context is not None
            and context.shareable
            and record.status == "done"
            and record.finish_reason == "stop"
            and record.answer
        ):
            entry = CachedAnswer(record.answer, record.model, tuple(citations), dict(record.usage))
            self._cache.stats.stores += 1
        return self._cache.store_call(probe, lookup.kb_version, entry)

    def _may_retry(self, attempt: int, deadline: float, backoff: float) -> bool:
        return attempt < self._llm_settings.max_retries and self._clock() + backoff < deadline

    async def _replay(self, turn: Turn, record: TurnRecord, timings: _Timings) -> None:
        """Answer a retried message with the answer already produced."""
        seq_base = turn.seq
        turn.publish(
            turn_started=pb.TurnStarted(
                client_message_id=turn.client_message_id, model=record.model, replayed=True
            )
        )
        if record.answer:
            timings.first_token = self._clock()
            turn.publish(text_delta=pb.TextDelta(text=record.answer))
        for citation in record.citations[:MAX_CITATIONS]:
            turn.publish(citation=pb.Citation(**citation))
        usage = TokenUsage(record.usage.get("input", 0), record.usage.get("output", 0))
        turn.publish(usage=usage_to_pb(usage))
        turn.usage = usage
        turn.outcome = "replayed"
        if turn.admission is not None:
            await self._refund(turn.admission)
        turn.publish(
            done=pb.TurnDone(
                finish_reason=_FINISH_REASONS.get(record.finish_reason, pb.FINISH_REASON_STOP),
                usage=usage_to_pb(usage),
                timings=timings.to_pb(self._clock()),
            )
        )
        assert turn.seq <= seq_base + _REPLAY_EVENTS

    async def _follow(self, turn: Turn, timings: _Timings, deadline: float | None) -> None:
        """A retried message whose turn runs on another instance: wait for its outcome."""
        limit = self._clock() + self._settings.turn_timeout
        deadline = limit if deadline is None else min(deadline, limit)
        key = (turn.tenant, turn.session_id, turn.client_message_id)
        while self._clock() < deadline:
            record = await self._store.turn_record(*key)
            if record is not None and record.status == "done":
                turn.seq = await self._store.reserve_seqs(
                    turn.tenant, turn.session_id, _REPLAY_EVENTS
                )
                await self._replay(turn, record, timings)
                return
            if record is None or record.status != "running":
                break
            await asyncio.sleep(_JOIN_POLL)
        turn.seq = await self._store.reserve_seqs(turn.tenant, turn.session_id, 1)
        if turn.admission is not None:
            await self._refund(turn.admission)  # no tokens were spent on this attempt
        turn.reason = "TURN_NOT_COMPLETED"
        turn.publish(
            error=error_event_body(
                KoreroError(
                    grpc.StatusCode.ABORTED,
                    "TURN_NOT_COMPLETED",
                    "the earlier attempt of this message did not complete; send it again",
                    retryable=True,
                ),
                turn.client_message_id,
            )
        )

    async def _finish(
        self,
        turn: Turn,
        record: TurnRecord,
        seq_base: int,
        *,
        summary: str = "",
        also: ScriptCall | None = None,
    ) -> None:
        # Persist before the terminal event; that event's seq counts as issued.
        # A cache store and the token settlement ride in the same pipeline.
        turn.finishing = True
        calls = [] if also is None else [also]
        if turn.admission is not None and self._limiter is not None:
            used = turn.usage.total_tokens if turn.usage is not None else 0
            settle = self._limiter.settlement(turn.admission, used)
            if settle is not None:
                calls.append(settle)
        with self._tracer.start_as_current_span("korero.persist"):
            await self._store.finish_turn(
                turn.tenant,
                turn.session_id,
                turn.client_message_id,
                record,
                seq_base,
                turn.seq + 1,
                summary=summary,
                also=calls,
            )

    async def _fail(self, turn: Turn, error: KoreroError, seq_base: int) -> None:
        log.info(
            "event=turn_error turn_id=%s code=%s reason=%s",
            turn.turn_id,
            error.code.name,
            error.reason,
        )
        turn.outcome = "error"
        turn.reason = error.reason
        record = TurnRecord(turn.turn_id, "failed", finish_reason=error.reason)
        try:
            # Frees the response cache's single-flight lock too, if this turn held it.
            await self._finish(
                turn, record, seq_base, also=self._cache_store_call(turn, None, record, [])
            )
        except KoreroError as store_error:
            # The turn still ends with one terminal event; its lock expires on its own.
            log.warning("event=finish_turn_failed reason=%s", store_error.reason)
        turn.publish(error=error_event_body(error, turn.client_message_id))

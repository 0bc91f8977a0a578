"""The conversation engine: sessions and turns, independent of any transport.

A transport (the gRPC servicer, the WebSocket adapter) calls `open_session`
once per stream and `start_turn` per user message, and receives
`korero.chat.v1.Event` messages through a sink callable. The engine checks
the message, routes it, admits it against the rate limits, begins the turn in
the store (one round trip that also reads the KB version and probes the
response cache) and hands the turn to the `TurnRunner`, which publishes
exactly one terminal event (`done` or `error`) whatever fails, and persists
the outcome before publishing it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from korero.chat.v1 import chat_pb2 as pb
from korero.server.context.assembly import ContextAssembler
from korero.server.context.cache import CacheLookup, CacheProbe, ResponseCache
from korero.server.context.knowledge import KnowledgeStore
from korero.server.context.router import IntentRouter, RouteDecision, RuleRouter
from korero.server.conversation.early import EarlyAnswer, EarlyStarts
from korero.server.conversation.generation import AnswerGenerator
from korero.server.conversation.runner import REPLAY_EVENTS, TurnRunner
from korero.server.conversation.tools_loop import ToolLoop
from korero.server.conversation.turn import EventSink, StageTimings, Turn, TurnPlan
from korero.server.conversation.validation import (
    validate_message,
    validate_metadata,
    validate_session_id,
)
from korero.server.conversation.wire import error_event_body, message_to_pb, session_to_pb
from korero.server.errors import (
    InvalidArgumentError,
    KoreroError,
    ShuttingDownError,
    StoreUnavailableError,
)
from korero.server.llm.provider import LLMProvider, estimate_tokens
from korero.server.policy.ratelimit import RateLimiter
from korero.server.settings import EngineSettings, LLMSettings
from korero.server.storage.records import SessionRecord, TurnBegin
from korero.server.storage.scripts import ScriptCall
from korero.server.storage.sessions import SessionStore
from korero.server.telemetry import Metrics

__all__ = ["ConversationEngine", "EventSink", "Turn"]

log = logging.getLogger(__name__)

_MAX_PAGE_SIZE = 500
_DEFAULT_PAGE_SIZE = 50


def _turn_in_flight(turn_id: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        "TURN_IN_FLIGHT", f"turn {turn_id} is still in flight; wait for it to end or cancel it"
    )


class ConversationEngine:
    """Sessions and turns over a store, an LLM provider and a context assembler."""

    def __init__(
        self,
        *,
        store: SessionStore,
        llm: LLMProvider,
        assembler: ContextAssembler,
        settings: EngineSettings,
        llm_settings: LLMSettings,
        snippet_chars: int = 240,
        clock: Callable[[], float] = time.monotonic,
        router: IntentRouter | None = None,
        cache: ResponseCache | None = None,
        knowledge: KnowledgeStore | None = None,
        limiter: RateLimiter | None = None,
        metrics: Metrics | None = None,
        tracer: trace.Tracer | None = None,
        tool_loop: ToolLoop | None = None,
    ) -> None:
        self._store = store
        self._assembler = assembler
        self._settings = settings
        self._model = llm_settings.model
        self._clock = clock
        self._turns: dict[tuple[str, str, str], Turn] = {}
        self._router: IntentRouter = router or RuleRouter()
        self._cache = cache
        self._knowledge = knowledge
        self._limiter = limiter
        self._metrics = metrics
        self._tracer = tracer or trace.get_tracer(__name__)
        # Reserved per message before the history is known; settled to real usage.
        self._base_reservation = estimate_tokens(settings.system_prompt) + llm_settings.max_tokens
        # Early upstream requests (early.py): the generator asks the model through it.
        self._early = _early_starts(
            llm, assembler, settings, llm_settings, cache, tool_loop, metrics
        )
        self._runner = TurnRunner(
            store=store,
            assembler=assembler,
            generator=AnswerGenerator(
                llm=self._early or llm,
                settings=llm_settings,
                tracer=self._tracer,
                clock=clock,
                tool_loop=tool_loop,
            ),
            settings=settings,
            model=llm_settings.model,
            snippet_chars=snippet_chars,
            tracer=self._tracer,
            cache=cache,
            limiter=limiter,
            record_cache_request=self._count_cache_request,
            clock=clock,
            tool_loop=tool_loop,
            early=self._early,
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
            if self._early is not None:  # its first prompt is known: no history yet
                self._early.opened(record, resumed=False)
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
        size = min(page_size or _DEFAULT_PAGE_SIZE, _MAX_PAGE_SIZE)
        messages, token = await self._store.list_messages(tenant, session_id, size, page_token)
        return pb.ListMessagesResponse(
            messages=[message_to_pb(m) for m in messages], next_page_token=token
        )

    # Turns --------------------------------------------------------------------

    def check_message(self, message: pb.UserMessage) -> None:
        """Raise `InvalidArgumentError` if `start_turn` would refuse `message` as input."""
        validate_message(message, self._settings.max_message_bytes)

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
        validate_message(message, self._settings.max_message_bytes)
        started = self._clock()
        key = (tenant, session_id, message.client_message_id)
        local = self._turns.get(key)
        if local is not None:  # a retry of a message whose turn runs here: join it
            local.subscribe(sink)
            return local
        route = await self._router.route(message.text)
        # Early upstream request (early.py): sent now, used once begin-turn confirms its prompt;
        # closed (and counted) if the turn is refused or never starts here.
        early = None
        if self._early is not None:
            early = await self._early.start(tenant, session_id, message, route)
        try:
            return await self._begin_turn(
                tenant, session_id, message, sink, deadline, started, key, route, early
            )
        except BaseException:
            if self._early is not None:
                self._early.discard(early, "refused")
            raise

    async def _begin_turn(
        self,
        tenant: str,
        session_id: str,
        message: pb.UserMessage,
        sink: EventSink,
        deadline: float | None,
        started: float,
        key: tuple[str, str, str],
        route: RouteDecision,
        early: EarlyAnswer | None,
    ) -> Turn:
        """`start_turn` after routing: admission, begin-turn, the turn's task."""
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
                "gen_ai.request.model": self._model,
            },
        )
        scope = otel_context.attach(trace.set_span_in_context(turn_span))
        try:
            begin, probe, lookup, kb_version = await self._begin(
                tenant, session_id, message, route, deadline
            )
            if begin.status == "busy":
                raise _turn_in_flight(begin.turn_id)
        except KoreroError as error:
            turn_span.set_status(trace.StatusCode.ERROR, error.reason)
            turn_span.end()
            otel_context.detach(scope)
            if admission is not None:
                await self._runner.refund(admission)
            raise
        turn = Turn(
            tenant,
            session_id,
            begin.turn_id,
            message.client_message_id,
            begin.seq_base,
            plan=TurnPlan(route, admission, probe, kb_version, early),
            lookup=lookup,
            span=turn_span,
            timings=StageTimings(started=started, session_load=self._clock() - started),
        )
        turn_span.set_attribute("korero.turn_id", turn.turn_id)
        turn.subscribe(sink)
        if begin.status != "started" and self._early is not None:  # answered without the model
            self._early.discard(early, "refused")
        body = self._body(turn, begin, message, deadline)
        self._turns[key] = turn
        try:  # the task copies the context now: its spans are children of the turn
            turn.task = asyncio.create_task(
                self._guard(turn, key, body), name=f"turn-{turn.turn_id}"
            )
        finally:
            otel_context.detach(scope)
        return turn

    def _body(
        self, turn: Turn, begin: TurnBegin, message: pb.UserMessage, deadline: float | None
    ) -> Coroutine[Any, Any, None]:
        """What the turn's task does after `begin`: run it, replay it, or follow it."""
        if begin.status == "started":
            assert begin.session is not None
            return self._runner.run(turn, begin.session, begin.history, message.text, deadline)
        if begin.status == "replay":
            assert begin.record is not None
            return self._runner.replay(turn, begin.record)
        return self._follow(turn, message, deadline)

    async def _follow(self, turn: Turn, message: pb.UserMessage, deadline: float | None) -> None:
        """A retried message whose turn runs elsewhere: wait for it while its lease lives.

        Once it ends (or its holder stops renewing the lease), begin again: the
        store replays the answer, or declares the orphaned turn failed and runs
        the message here.
        """
        limit = self._clock() + self._settings.turn_timeout
        deadline_ = limit if deadline is None else min(deadline, limit)
        route = turn.plan.route
        assert route is not None
        try:
            while await self._runner.await_settled(turn, deadline_):
                begin, probe, lookup, kb_version = await self._begin(
                    turn.tenant, turn.session_id, message, route, deadline
                )
                if begin.status == "running":
                    turn.turn_id = begin.turn_id  # taken over by another instance: follow it
                    continue
                if begin.status == "busy":
                    await self._runner.not_completed(turn, _turn_in_flight(begin.turn_id))
                    return
                turn.turn_id, turn.seq, turn.lookup = begin.turn_id, begin.seq_base, lookup
                turn.plan = dataclasses.replace(turn.plan, cache_probe=probe, kb_version=kb_version)
                turn.span.set_attribute("korero.turn_id", turn.turn_id)
                await self._body(turn, begin, message, deadline)
                return
        except KoreroError as error:
            await self._runner.not_completed(turn, error)
            return
        await self._runner.not_completed(turn)

    async def _begin(
        self,
        tenant: str,
        session_id: str,
        message: pb.UserMessage,
        route: RouteDecision,
        deadline: float | None,
    ) -> tuple[TurnBegin, CacheProbe | None, CacheLookup | None, int]:
        """`begin_turn` with the KB version and the cache lookup in the same round trip.

        A begin that Redis may or may not have run (a timeout) is given up
        (`abort_begin`) before the caller hears of the failure, so no lease or
        running record is left behind for a message the client was told failed.
        """
        also: list[ScriptCall] = []
        if self._knowledge is not None:
            also.append(self._knowledge.version_call(tenant))
        probe = None
        if self._cache is not None:
            probe = self._cache.probe(
                tenant, message.text, route, self._assembler.prompt_version, self._model
            )
            also.append(probe.call)
        attempt = uuid.uuid4().hex
        with self._tracer.start_as_current_span("korero.session_load"):
            try:
                begin = await self._store.begin_turn(
                    tenant,
                    session_id,
                    message.client_message_id,
                    message.text,
                    REPLAY_EVENTS,
                    attempt=attempt,
                    intent=route.intent,
                    also=also,
                )
            except StoreUnavailableError:
                await self._abort_begin(
                    tenant, session_id, message.client_message_id, attempt, deadline
                )
                raise
        replies = list(begin.replies)
        kb_version = int(replies.pop(0)) if self._knowledge is not None else 0
        lookup = probe.parse(replies.pop(0)) if probe is not None else None
        if self._knowledge is None and lookup is not None:
            kb_version = lookup.kb_version
        if (
            self._cache is not None
            and probe is not None
            and lookup is not None
            and lookup.status == "leader"
            and begin.status != "started"
        ):  # no answer will be generated here: free identical misses at once
            await self._cache.release(probe, lookup.kb_version)
        return begin, probe, lookup, kb_version

    async def _abort_begin(
        self, tenant: str, session_id: str, cmid: str, attempt: str, deadline: float | None
    ) -> None:
        """Give up a begin of unknown outcome, retrying while Redis does not answer."""
        give_up = self._clock() + self._settings.store_resolve_seconds
        if deadline is not None:
            give_up = min(give_up, deadline)
        tries = 0
        while True:
            try:
                async with asyncio.timeout(max(0.0, give_up - self._clock())):
                    found = await self._store.abort_begin(tenant, session_id, cmid, attempt)
                log.info("event=begin_aborted found=%s tries=%d", found, tries + 1)
                return
            except (StoreUnavailableError, TimeoutError):
                tries += 1
                pause = min(0.1 * tries, 0.5)
                if self._clock() + pause >= give_up:
                    # Unknown still: the lease (no one renews it) frees the session soon.
                    log.warning("event=begin_unresolved tries=%d", tries)
                    return
                await asyncio.sleep(pause)

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

    async def _guard(
        self, turn: Turn, key: tuple[str, str, str], body: Coroutine[Any, Any, None]
    ) -> None:
        try:
            await body
        except Exception:  # a bug: the turn still ends with one terminal event
            log.exception("event=turn_crashed turn_id=%s", turn.turn_id)
            if not turn.ended:
                turn.result.reason = "INTERNAL"
                turn.publish(
                    error=error_event_body(
                        KoreroError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error"),
                        turn.client_message_id,
                    )
                )
        finally:
            if self._early is not None:  # unused by the runner: the session changed elsewhere
                self._early.discard(turn.plan.early, "stale")
            self._turns.pop(key, None)
            turn.sinks.clear()
            turn.finished.set()
            self._observe(turn)

    def _count_cache_request(self, hit: bool) -> None:
        if self._metrics is not None:
            self._metrics.cache_requests.labels("hit" if hit else "miss").inc()

    def _observe(self, turn: Turn) -> None:
        span = turn.span
        result = turn.result
        span.set_attribute("korero.outcome", result.outcome)
        if result.reason:
            span.set_attribute("korero.error_reason", result.reason)
            span.set_status(trace.StatusCode.ERROR, result.reason)
        span.end()
        if self._metrics is None or turn.timings is None:
            return
        timings = turn.timings
        usage = result.usage
        counted = usage is not None and result.outcome != "replayed"
        self._metrics.turn_ended(
            tenant=turn.tenant,
            model=self._model,
            outcome=result.outcome,
            reason=result.reason,
            duration=self._clock() - timings.started,
            time_to_first_token=(
                None if timings.first_token is None else timings.first_token - timings.started
            ),
            input_tokens=usage.input_tokens if counted and usage is not None else 0,
            output_tokens=usage.output_tokens if counted and usage is not None else 0,
        )


def _early_starts(
    llm: LLMProvider,
    assembler: ContextAssembler,
    settings: EngineSettings,
    llm_settings: LLMSettings,
    cache: ResponseCache | None,
    tool_loop: ToolLoop | None,
    metrics: Metrics | None,
) -> EarlyStarts | None:
    """Early upstream requests as configured (None: off)."""
    if not settings.early_upstream:
        return None

    async def offers_tools(tenant: str, route: RouteDecision, session: SessionRecord) -> bool:
        if tool_loop is None:
            return False
        offered = await tool_loop.turn(tenant, route.intent, session.metadata, _ignore, None)
        return offered is not None

    def count(outcome: str, wasted_tokens: int) -> None:
        if metrics is not None:
            metrics.early_requests.labels(outcome).inc()
            if wasted_tokens:
                metrics.early_wasted_tokens.inc(wasted_tokens)

    return EarlyStarts(
        llm=llm,
        assembler=assembler,
        model=llm_settings.model,
        max_tokens=llm_settings.max_tokens,
        temperature=llm_settings.temperature,
        prompt_history_messages=settings.prompt_history_messages,
        cache_on=cache is not None,
        offers_tools=offers_tools,
        count=count,
    )


def _ignore(*_args: object, **_kwargs: object) -> None:
    return None

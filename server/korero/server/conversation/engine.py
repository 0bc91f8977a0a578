"""The conversation engine: sessions and turns, independent of any transport.

A transport (the gRPC servicer, the WebSocket adapter) calls `open_session`
once per stream and `start_turn` per user message, and receives
`korero.chat.v1.Event` messages through a sink callable. The engine checks
the message, routes it, admits it against the rate limits, begins the turn in
the store (one round trip that also reads the KB version and probes the
response cache) and hands the turn to the `TurnRunner`, which publishes
exactly one terminal event (`done` or `error`) whatever fails, and persists
the outcome before publishing it.

Longer than 400 lines: it is the one place where a message becomes a turn —
opening and resuming sessions (one cursor rule), beginning a turn (early
request, admission, begin script, joining or replaying a retried message,
handing a message to a person) and detaching it when its client goes away
share the live-turn tables `_turns`/`_live`; what a turn does once begun is
in runner.py, the wire format in wire.py, validation in validation.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
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
from korero.server.conversation.eventlog import TurnLog
from korero.server.conversation.generation import AnswerGenerator
from korero.server.conversation.hooks import HandoffHook
from korero.server.conversation.records import SessionRecords
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
    HistoryUnavailableError,
    InvalidArgumentError,
    KoreroError,
    NotFoundError,
    ShuttingDownError,
    StoreUnavailableError,
)
from korero.server.llm.provider import LLMProvider, estimate_tokens
from korero.server.policy.pacing import SessionOpenPacer
from korero.server.policy.ratelimit import RateLimiter
from korero.server.settings import EngineSettings, LLMSettings
from korero.server.storage.history import HistoryStore
from korero.server.storage.outbox import OutboxWriter
from korero.server.storage.records import SessionRecord, TurnBegin
from korero.server.storage.scripts import ScriptCall
from korero.server.storage.sessions import SessionStore
from korero.server.telemetry import Metrics

__all__ = ["ConversationEngine", "EventSink", "OpenedSession", "Turn"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenedSession:
    """A session opened on a stream: what to send first, and what to join."""

    started: pb.Event
    """`session_started`; its seq is the stream's starting cursor."""
    missed: list[pb.Event]
    """On a resume from a cursor: the logged events after it, in order."""
    inflight: str
    """The turn holding the session when it was opened ("" if none)."""
    inflight_cmid: str
    """Its client_message_id."""
    cursor: int
    """The last seq the stream has delivered once `missed` is sent."""

    @property
    def session_id(self) -> str:
        return self.started.session_id


_MAX_PAGE_SIZE = 500
_REHYDRATE_ATTEMPTS = 20


def _handoff_ended() -> KoreroError:
    return KoreroError(
        grpc.StatusCode.ABORTED,
        "HANDOFF_CHANGED",
        "a person has just joined or left the conversation; send the message again",
        retryable=True,
    )


def _turn_in_flight(turn_id: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        "TURN_IN_FLIGHT", f"turn {turn_id} is still in flight; wait for it to end or cancel it"
    )


_DEFAULT_PAGE_SIZE = 50


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
        handoff: HandoffHook | None = None,
        history: HistoryStore | None = None,
        outbox: OutboxWriter | None = None,
        opens: SessionOpenPacer | None = None,
    ) -> None:
        self._store = store
        self._opens = opens
        self._outbox = outbox
        self._records = (
            None if history is None else SessionRecords(store, history, outbox, settings)
        )
        self._assembler = assembler
        self._settings = settings
        self._model = llm_settings.model
        self._clock = clock
        self._turns: dict[tuple[str, str, str], Turn] = {}
        self._live: dict[tuple[str, str], Turn] = {}
        """The turn holding each session that runs on this instance."""
        self._router: IntentRouter = router or RuleRouter()
        self._cache = cache
        self._knowledge = knowledge
        self._limiter = limiter
        self._metrics = metrics
        self._tracer = tracer or trace.get_tracer(__name__)
        self._handoff = handoff
        # Reserved per message before the history is known; settled to real usage.
        self._base_reservation = estimate_tokens(settings.system_prompt) + llm_settings.max_tokens
        # Early upstream requests (early.py): the generator asks the model through it.
        self._early = _early_starts(
            llm, assembler, settings, llm_settings, cache, tool_loop, metrics, handoff
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
            outbox=outbox,
            handoff=handoff,
        )

    def attach_history(self, history: HistoryStore | None, outbox: OutboxWriter | None) -> None:
        """Use PostgreSQL (and the outbox writer that feeds it); wiring calls this once."""
        self._records = (
            None
            if history is None
            else SessionRecords(self._store, history, outbox, self._settings)
        )
        self._runner.attach_outbox(outbox)

    def forget_early(self, tenant: str, session_id: str) -> None:
        """The session's next prompt is not known here (e.g. a handoff): no early request."""
        if self._early is not None:
            self._early.forget(tenant, session_id)

    @property
    def cache(self) -> ResponseCache | None:
        return self._cache

    @property
    def handoff(self) -> HandoffHook | None:
        return self._handoff

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
        self,
        tenant: str,
        session_id: str,
        metadata: pb.SessionMetadata,
        after_seq: int | None = None,
    ) -> OpenedSession:
        """Start (empty `session_id`) or resume a session.

        Its `session_started` event carries the stream's starting cursor as its
        seq: `after_seq` when given (the logged events after it come back as
        `missed`, to be sent next), else the last seq before the turn in flight
        (whose events the stream may then join), else the last seq handed out.
        """
        meta = validate_metadata(metadata)
        if session_id:
            validate_session_id(session_id)
        elif after_seq:
            raise InvalidArgumentError(
                "CURSOR_WITHOUT_SESSION", "after_seq needs the session_id it belongs to"
            )
        if self._opens is None:
            return await self._open_session(tenant, session_id, meta, after_seq)
        async with self._opens.slot():  # a burst of opens is paced, not failed
            return await self._open_session(tenant, session_id, meta, after_seq)

    async def _open_session(
        self, tenant: str, session_id: str, meta: dict[str, Any], after_seq: int | None
    ) -> OpenedSession:
        if session_id:
            try:
                record = await self._store.resume_session(tenant, session_id, meta, after_seq)
            except InvalidArgumentError as missing:
                record = await self._resume_lost(tenant, session_id, meta, missing, after_seq)
        else:
            record = await self._store.create_session(tenant, meta)
            if self._early is not None:  # its first prompt is known: no history yet
                self._early.opened(record, resumed=False)
        started = pb.SessionStarted(resumed=bool(session_id), session=session_to_pb(record))
        if after_seq is None:
            cursor = record.turn_base if record.inflight else record.last_seq
            event = pb.Event(session_id=record.session_id, seq=cursor, session_started=started)
            return OpenedSession(event, [], record.inflight, record.inflight_cmid, cursor)
        if after_seq > max(record.last_seq, record.seq_top):
            raise InvalidArgumentError(
                "CURSOR_AHEAD",
                f"after_seq {after_seq} is beyond the last seq of the session ({record.last_seq})",
            )
        missed = [pb.Event.FromString(raw) for _, raw in record.missed]
        replay = pb.Replay(after_seq=after_seq, through_seq=missed[-1].seq if missed else after_seq)
        if after_seq < record.log_floor:
            replay.truncated = True
            replay.first_seq = missed[0].seq if missed else record.log_floor + 1
        started.replay.CopyFrom(replay)
        event = pb.Event(session_id=record.session_id, seq=after_seq, session_started=started)
        return OpenedSession(
            event, missed, record.inflight, record.inflight_cmid, replay.through_seq
        )

    async def resume_turn(
        self,
        tenant: str,
        session_id: str,
        client_message_id: str,
        after_seq: int,
        sink: EventSink,
        deadline: float | None = None,
    ) -> tuple[list[pb.Event], Turn | None] | None:
        """The events of a message's turn after `after_seq`, from the session's log, and
        that turn if still in flight (joined: its later events go to `sink`), or None when
        the log has nothing of that message's turn after the cursor (start it as usual).

        For a `SendMessage` retried with a cursor: the client gets the rest of the same
        turn, with the same seqs, instead of a replayed turn.
        """
        validate_session_id(session_id)
        opened = await self.open_session(tenant, session_id, pb.SessionMetadata(), after_seq)
        state = await self._store.turn_state(tenant, session_id, client_message_id)
        turn_id = state.record.turn_id if state.record is not None else ""
        if not turn_id:
            return None
        logged = [e for e in opened.missed if e.turn_id == turn_id]
        if logged and logged[-1].WhichOneof("kind") in ("done", "error"):
            return logged, None
        if opened.inflight != turn_id:
            return (logged, None) if logged else None
        last = logged[-1].seq if logged else after_seq
        turn = self.join_live(tenant, session_id, turn_id, last, sink, deadline, client_message_id)
        return logged, turn

    def join_live(
        self,
        tenant: str,
        session_id: str,
        turn_id: str,
        after_seq: int,
        sink: EventSink,
        deadline: float | None = None,
        client_message_id: str = "",
    ) -> Turn | None:
        """Deliver the turn in flight's events above `after_seq` to `sink`, then live.

        A turn on this instance is subscribed to; one on another instance is
        followed through the session's event log. None when it has ended.
        """
        local = self._live.get((tenant, session_id))
        if local is not None and not local.done:
            local.subscribe(sink, after_seq)
            return local
        if not turn_id:
            return None
        follower = Turn(tenant, session_id, turn_id, client_message_id, after_seq, following=True)
        follower.subscribe(sink)
        key = (tenant, session_id, f"follow:{turn_id}:{id(follower)}")
        self._turns[key] = follower
        follower.task = asyncio.create_task(
            self._guard(follower, key, self._relay(follower, deadline)),
            name=f"follow-{turn_id}",
        )
        return follower

    async def _resume_lost(
        self,
        tenant: str,
        session_id: str,
        meta: dict[str, Any] | None,
        missing: InvalidArgumentError,
        after_seq: int | None,
    ) -> SessionRecord:
        """Resume a session missing from Redis: rehydrated whole from PostgreSQL, or lost."""
        if self._records is None:
            raise missing
        for _ in range(_REHYDRATE_ATTEMPTS):
            if not await self._records.rehydrate(tenant, session_id):
                raise missing
            try:
                return await self._store.resume_session(tenant, session_id, meta, after_seq)
            except InvalidArgumentError:
                await asyncio.sleep(0.05)  # another stream is bringing it back
        raise HistoryUnavailableError("the session is being restored; try again")

    async def get_session(self, tenant: str, session_id: str) -> pb.Session:
        validate_session_id(session_id)
        try:
            return session_to_pb(await self._store.get_session(tenant, session_id))
        except NotFoundError:
            stored = (
                None if self._records is None else await self._records.session(tenant, session_id)
            )
            if stored is None:
                raise
        return session_to_pb(stored)

    async def list_messages(
        self, tenant: str, session_id: str, page_size: int, page_token: str
    ) -> pb.ListMessagesResponse:
        validate_session_id(session_id)
        if page_size < 0:
            raise InvalidArgumentError("PAGE_SIZE_INVALID", "page_size must not be negative")
        size = min(page_size or _DEFAULT_PAGE_SIZE, _MAX_PAGE_SIZE)
        if self._records is None:
            messages, token = await self._store.list_messages(tenant, session_id, size, page_token)
        else:
            messages, token = await self._records.page(tenant, session_id, size, page_token)
        return pb.ListMessagesResponse(
            messages=[message_to_pb(m) for m in messages], next_page_token=token
        )

    async def delete_session(self, tenant: str, session_id: str, allow_missing: bool) -> None:
        """Delete the session from Redis (state, outbox, event log) and PostgreSQL (AIP-135).

        Idempotent with `allow_missing`; otherwise deleting an unknown session is NOT_FOUND.
        """
        validate_session_id(session_id)
        for key, turn in list(self._turns.items()):
            if key[:2] == (tenant, session_id):
                turn.cancel()
        if self._handoff is not None:  # a request waiting in the queue leaves it: abandoned
            with contextlib.suppress(KoreroError):  # an agent has it: theirs to close
                await self._handoff.withdraw(tenant, session_id, deleted=True)
        # Redis first: once the outbox is gone nothing can write the session back.
        existed = await self._store.delete_session(tenant, session_id)
        if self._records is not None:
            existed = await self._records.delete(tenant, session_id) or existed
        if not existed and not allow_missing:
            raise NotFoundError("SESSION_NOT_FOUND", f"no session {session_id!r}")
        log.info("event=session_deleted tenant=%s existed=%s", tenant, existed)

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

        A caller going away cannot cut it in half: cancelled mid-way (the stream
        ended while the turn was being begun), the begin still completes — its
        Redis script may already hold the session — and the new turn is detached
        at once: it runs through the detach grace like any turn whose client went
        away, instead of leaving a lock behind with nothing running it.
        """
        task = asyncio.ensure_future(self._start_turn(tenant, session_id, message, sink, deadline))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._orphaned(done, sink))
            raise

    def _orphaned(self, task: asyncio.Future[Turn], sink: EventSink) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self.detach(task.result(), sink)

    async def _start_turn(
        self,
        tenant: str,
        session_id: str,
        message: pb.UserMessage,
        sink: EventSink,
        deadline: float | None,
    ) -> Turn:
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
            turn = await self._begin_turn(key, message, sink, deadline, started, route, early)
        except BaseException:
            if self._early is not None:
                self._early.discard(early, "refused")
            raise
        if self._early is not None and turn.plan.early is not early:  # a person answers it
            self._early.discard(early, "refused")
        return turn

    async def _begin_turn(
        self,
        key: tuple[str, str, str],
        message: pb.UserMessage,
        sink: EventSink,
        deadline: float | None,
        started: float,
        route: RouteDecision,
        early: EarlyAnswer | None,
    ) -> Turn:
        """`start_turn` after routing: admission, begin-turn, the turn's task.

        `key` is (tenant, session id, client message id).
        """
        tenant, session_id, _ = key
        signals = self._handoff.signals(message.text, route) if self._handoff else None
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
                tenant, session_id, message, route, deadline, signals
            )
            if begin.status == "human":  # a person owns the session: the bot stays silent
                relayed = await self._to_person(
                    tenant, session_id, begin.turn_id, message, route, sink
                )
                turn_span.end()
                otel_context.detach(scope)
                if admission is not None:
                    await self._runner.refund(admission)
                return relayed
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
            plan=TurnPlan(route, admission, probe, kb_version, signals, early),
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

    async def _to_person(
        self,
        tenant: str,
        session_id: str,
        handoff_id: str,
        message: pb.UserMessage,
        route: RouteDecision,
        sink: EventSink,
    ) -> Turn:
        """Hand a message to the person who owns the session (handoff/)."""
        relayed = None
        if self._handoff is not None:
            signals = self._handoff.signals(message.text, route)
            relayed = await self._handoff.relay(
                tenant, session_id, handoff_id, message, signals, route, sink
            )
        if relayed is None:  # the agent let go of the session a moment ago
            raise _handoff_ended()
        return relayed

    def _body(
        self, turn: Turn, begin: TurnBegin, message: pb.UserMessage, deadline: float | None
    ) -> Coroutine[Any, Any, None]:
        """What the turn's task does after `begin`: run it, replay it, or follow it."""
        if begin.status == "started":
            assert begin.session is not None
            turn.log = TurnLog(self._store, turn.tenant, turn.session_id, turn.turn_id)
            self._live[(turn.tenant, turn.session_id)] = turn
            return self._runner.run(turn, begin.session, begin.history, message.text, deadline)
        if begin.status == "replay":
            assert begin.record is not None
            turn.log = TurnLog(self._store, turn.tenant, turn.session_id, "")
            return self._runner.replay(turn, begin.record)
        return self._follow(turn, message, deadline)

    async def _follow(self, turn: Turn, message: pb.UserMessage, deadline: float | None) -> None:
        """A retried message whose turn runs elsewhere: wait for it while its lease lives.

        Once it ends (or its holder stops renewing the lease), begin again: the
        store replays the answer, or declares the orphaned turn failed and runs
        the message here. (A stream that resumes from a cursor joins the running
        turn live instead: `join_live`.)
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
                if begin.status == "human":  # a person took the session over meanwhile
                    await self._runner.not_completed(turn, _handoff_ended())
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

    async def _relay(self, turn: Turn, deadline: float | None) -> None:
        """A stream resumed on this instance while the turn runs on another: relay it."""
        try:
            ended = await self._runner.follow(turn, deadline, self._watch_seconds)
        except KoreroError as error:
            await self._runner.not_completed(turn, error)
            return
        if not ended:
            await self._runner.not_completed(turn)

    async def _begin(
        self,
        tenant: str,
        session_id: str,
        message: pb.UserMessage,
        route: RouteDecision,
        deadline: float | None,
        signals: dict[str, float] | None = None,
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
                    signals=signals,
                    also=also,
                )
            except StoreUnavailableError as error:
                if error.maybe_applied:  # a refused begin (e.g. OOM) did not run: nothing to undo
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

    def detach(self, turn: Turn, sink: EventSink) -> None:
        """A client went away from `turn`: unless another is attached within the detach
        grace (a resume), the turn is cancelled (which closes the upstream request)."""
        turn.unsubscribe(sink)
        if turn.done or turn.sinks or turn.grace is not None:
            return
        grace = self._settings.detach_grace
        if grace <= 0 or turn.following:  # a relay is only stopped, the turn runs on
            turn.cancel()
            return
        loop = asyncio.get_running_loop()
        turn.grace = loop.call_later(grace, lambda: loop.create_task(self._grace_over(turn)))

    async def _grace_over(self, turn: Turn) -> None:
        turn.grace = None
        if turn.done or turn.sinks:
            return
        try:  # a stream on another instance may be following it through the log
            remaining = await self._store.watched_until(turn.tenant, turn.session_id) - time.time()
        except KoreroError:
            remaining = 0.0
        if remaining > 0:
            loop = asyncio.get_running_loop()
            turn.grace = loop.call_later(
                remaining, lambda: loop.create_task(self._grace_over(turn))
            )
            return
        log.info("event=detach_grace_over turn_id=%s", turn.turn_id)
        turn.cancel()

    @property
    def _watch_seconds(self) -> float:
        """How long one poll of a follower keeps a detached owner from cancelling."""
        return max(1.0, self._settings.detach_grace)

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
            if turn.grace is not None:
                turn.grace.cancel()
            self._turns.pop(key, None)
            if self._live.get((turn.tenant, turn.session_id)) is turn:
                del self._live[(turn.tenant, turn.session_id)]
            turn.sinks.clear()
            turn.finished.set()
            self._observe(turn)
        if turn.log is not None and not turn.log.closed:
            await turn.log.drain()  # a replay's events are logged after it was sent

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
    handoff: HandoffHook | None,
) -> EarlyStarts | None:
    """Early upstream requests as configured (None: off)."""
    if not settings.early_upstream:
        return None

    async def offers_tools(tenant: str, route: RouteDecision, session: SessionRecord) -> bool:
        if tool_loop is None:
            return False
        turn = await tool_loop.turn(tenant, route.intent, session.metadata, _ignore, None)
        return turn is not None and bool(turn.offered)

    def may_hand_off(text: str, route: RouteDecision) -> bool:
        """A message the handoff policy may escalate (the model would not be asked)."""
        if handoff is None:
            return False
        if route.intent in ("human_request", "complaint"):
            return True
        return handoff.signals(text, route).get("sentiment", 0.0) < 0

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
        may_hand_off=may_hand_off,
        count=count,
    )


def _ignore(*_args: object, **_kwargs: object) -> None:
    return None

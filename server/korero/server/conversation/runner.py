"""A turn's lifecycle, from `turn_started` to its one terminal event.

`TurnRunner.run` drives a new turn: the response cache (a hit is replayed),
context assembly (a fallback answer skips the model), generation, then the
outcome is persisted (`finish`) before the terminal event is published.
`replay` answers a retried message whose answer is stored; `await_settled`
waits while a retried message's turn runs on another instance. Whatever
fails, the turn ends with exactly one `done` or `error` event (`fail`).

While a turn runs it renews its lease on the session (`KORERO_TURN_LEASE`),
so a crashed instance's turn is declared failed within seconds. A finish whose
outcome a Redis timeout left unknown is sent again (it applies once) until it
is known or `KORERO_STORE_RESOLVE_SECONDS` (or the client's deadline) runs
out; the terminal event follows what is stored, never the other way round.

Longer than 400 lines on purpose: it is one lifecycle read top to bottom, and
every path out of it (done, replay, fail) shares the same persistence step;
splitting them would pass the same half-dozen collaborators around.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import trace

from korero.chat.v1 import chat_pb2 as pb
from korero.server.context import citations as cite
from korero.server.context.assembly import AssembledContext, ContextAssembler, ContextRequest
from korero.server.context.cache import CachedAnswer, CacheLookup, ResponseCache
from korero.server.conversation.coalesce import DeltaCoalescer
from korero.server.conversation.early import EarlyStarts
from korero.server.conversation.generation import AnswerGenerator
from korero.server.conversation.hooks import HandoffHook
from korero.server.conversation.tools_loop import ToolLoop, ToolTurn
from korero.server.conversation.turn import Turn
from korero.server.conversation.wire import (
    FINISH_REASONS,
    duration,
    error_event_body,
    rate_limit_status,
    usage_to_pb,
)
from korero.server.errors import KoreroError, StoreUnavailableError
from korero.server.llm.provider import TokenUsage, display_model, estimate_tokens
from korero.server.policy.ratelimit import Admission, RateLimiter
from korero.server.settings import EngineSettings
from korero.server.storage.outbox import OutboxWriter
from korero.server.storage.records import (
    FinishOutcome,
    SessionRecord,
    StoredMessage,
    TurnRecord,
)
from korero.server.storage.scripts import ScriptCall
from korero.server.storage.sessions import SessionStore

__all__ = ["MAX_CITATIONS", "REPLAY_EVENTS", "TurnRunner"]

log = logging.getLogger(__name__)

MAX_CITATIONS = 3
REPLAY_EVENTS = 5 + MAX_CITATIONS  # started, rate limit, one delta, citations, usage, done
_LOG_BATCH = 500
_CACHED_DELTA_CHARS = 160  # a cached answer is replayed in pieces of about this size
_JOIN_POLL = 0.05
_RESOLVE_BACKOFF = 0.1  # seconds; grows per attempt, at most 0.5
_FINISH_FLOOR = 0.15  # seconds a finish may take even at the deadline (see deadline_margin)


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


def _relay(turn: Turn, logged: list[tuple[int, bytes]]) -> bool:
    """Deliver the followed turn's logged events; True once its terminal event came."""
    for seq, raw in logged:
        if seq <= turn.seq:
            continue
        event = pb.Event.FromString(raw)
        if event.turn_id != turn.turn_id and turn.turn_id:
            turn.seq = max(turn.seq, seq)  # another turn's event: not ours to send
            continue
        turn.turn_id = turn.turn_id or event.turn_id
        if event.WhichOneof("kind") == "turn_started":
            turn.client_message_id = event.turn_started.client_message_id
        turn.deliver(event, logged=True)
        if event.WhichOneof("kind") in ("done", "error"):
            return True
    return False


def _trace_id(turn: Turn) -> str:
    ctx = turn.span.get_span_context()
    return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else ""


@dataclass
class _Answer:
    """What a turn produced, gathered while it runs."""

    model: str
    pieces: list[str] = field(default_factory=list)
    usage: TokenUsage | None = None
    finish: str | None = None
    context: AssembledContext | None = None
    cached: CacheLookup | None = None
    handoff: pb.HandoffRequested | None = None
    tools: ToolTurn | None = None
    """The turn's tools, when the model was offered any."""

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class TurnRunner:
    """Runs turns over the store, the cache, context assembly and the generator."""

    def __init__(
        self,
        *,
        store: SessionStore,
        assembler: ContextAssembler,
        generator: AnswerGenerator,
        settings: EngineSettings,
        model: str,
        snippet_chars: int,
        tracer: trace.Tracer,
        cache: ResponseCache | None = None,
        limiter: RateLimiter | None = None,
        record_cache_request: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        handoff: HandoffHook | None = None,
        tool_loop: ToolLoop | None = None,
        early: EarlyStarts | None = None,
        outbox: OutboxWriter | None = None,
    ) -> None:
        self._tool_loop = tool_loop
        self._early = early
        self._store = store
        self._assembler = assembler
        self._generator = generator
        self._settings = settings
        self._model = model
        self._snippet_chars = snippet_chars
        self._tracer = tracer
        self._cache = cache
        self._limiter = limiter
        self._record_cache_request = record_cache_request or (lambda _hit: None)
        self._clock = clock
        self._handoff = handoff
        self._outbox = outbox

    def attach_outbox(self, outbox: OutboxWriter | None) -> None:
        """Commit each turn to PostgreSQL through this writer before its terminal event."""
        self._outbox = outbox

    # A new turn -----------------------------------------------------------------

    async def run(
        self,
        turn: Turn,
        session: SessionRecord,
        history: tuple[StoredMessage, ...],
        message: str,
        deadline: float | None,
    ) -> None:
        assert turn.timings is not None
        timings = turn.timings
        if self._handoff is not None:
            turn.sentiment = self._handoff.reading(turn.plan.signals, history)
        self._announce(turn)
        answer = _Answer(self._model)

        def emit_text(text: str) -> None:
            first = timings.first_token is None
            if first:
                timings.first_token = self._clock()
            turn.publish(text_delta=pb.TextDelta(text=text))
            if first and self._outbox is not None:
                # The user message on its way to PostgreSQL, once the first token is out:
                # the writer's work never competes with the first token.
                self._outbox.notify()

        coalescer = DeltaCoalescer(
            emit_text, self._settings.coalesce_window_ms / 1000, self._settings.coalesce_max_bytes
        )
        lease = asyncio.create_task(self._keep_lease(turn), name=f"lease-{turn.turn_id}")
        try:
            try:
                request = ContextRequest(
                    turn.tenant, session, message, history, turn.plan.route, turn.plan.kb_version
                )
                await self._produce(turn, request, deadline, coalescer, emit_text, answer)
                coalescer.flush()
            except asyncio.CancelledError:
                coalescer.flush()
                self._absorb_cancel(turn)
                answer.finish = "cancelled"
            await self._complete(turn, answer, deadline)
            if self._early is not None and answer.handoff is None:  # the next prompt (early.py)
                stored = None if answer.finish == "cancelled" else answer.text
                summary = answer.context.summary if answer.context is not None else None
                self._early.answered(turn, request, stored, summary)
        except KoreroError as error:
            coalescer.close()
            await self.fail(turn, error, deadline)
        except Exception:
            coalescer.close()
            log.exception("event=turn_failed turn_id=%s", turn.turn_id)
            await self.fail(
                turn,
                KoreroError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error"),
                deadline,
            )
        finally:
            lease.cancel()
        if answer.handoff is not None and self._handoff is not None and turn.result.reason == "":
            await self._handoff.escalate(turn, answer.handoff)  # after the terminal event

    async def _keep_lease(self, turn: Turn) -> None:
        """Renew the turn's lease while it runs; a lease taken over ends the turn."""
        every = self._settings.turn_lease / 3
        while True:
            await asyncio.sleep(every)
            try:
                held = await self._store.renew_turn(turn.tenant, turn.session_id, turn.turn_id)
            except KoreroError as error:  # Redis slow or down: the turn goes on
                log.warning(
                    "event=lease_renew_failed turn_id=%s reason=%s", turn.turn_id, error.reason
                )
                continue
            if not held:
                log.warning("event=lease_lost turn_id=%s", turn.turn_id)
                turn.cancel(error=_lease_lost())
                return

    def _announce(self, turn: Turn) -> None:
        """The first events of a turn: turn started, then the caller's rate-limit budget."""
        turn.publish(
            turn_started=pb.TurnStarted(
                client_message_id=turn.client_message_id,
                model=display_model(self._model),
                intent=turn.intent,
                trace_id=_trace_id(turn),
                sentiment=turn.sentiment,
            )
        )
        if turn.plan.admission is not None:
            turn.publish(rate_limit=rate_limit_status(turn.plan.admission))

    @staticmethod
    def _absorb_cancel(turn: Turn) -> None:
        """A cancel by the client ends the turn as `cancelled`; any other one is re-raised."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        if turn.cancel_reason is not None:
            raise turn.cancel_reason from None
        if not turn.cancelled_by_client:
            raise asyncio.CancelledError

    async def _produce(
        self,
        turn: Turn,
        request: ContextRequest,
        deadline: float | None,
        coalescer: DeltaCoalescer,
        emit_text: Callable[[str], None],
        answer: _Answer,
    ) -> None:
        """The answer's text: from the cache, a fallback, or the model."""
        assert turn.timings is not None
        timings = turn.timings
        with self._tracer.start_as_current_span("korero.cache_lookup") as cache_span:
            answer.cached = await self._cached_answer(turn, deadline)
            cache_span.set_attribute("korero.cache_hit", answer.cached is not None)
        started = self._clock()
        if answer.cached is None:
            with self._tracer.start_as_current_span("korero.context_assembly"):
                # The prompt of the early upstream request (early.py), if begin-turn confirmed it.
                early = self._early.use(turn.plan.early, request) if self._early else None
                answer.context = early or await self._assembler.assemble(request)
        timings.context_assembly = self._clock() - started
        limit = self._clock() + self._settings.turn_timeout
        deadline = limit if deadline is None else min(deadline, limit)
        cached = answer.cached.entry if answer.cached is not None else None
        escalation = None
        if self._handoff is not None:
            fallback = answer.context is not None and answer.context.fallback is not None
            escalation = self._handoff.escalation(turn, request.history, fallback=fallback)
        if escalation is not None:  # the bot says so in plain words, and nothing else
            answer.context = answer.cached = None
            _replay_pieces(escalation[0], emit_text, answer.pieces)
            answer.usage, answer.finish = TokenUsage(0, 0), "stop"
            answer.handoff = escalation[1]
            turn.publish(handoff_requested=escalation[1])
        elif cached is not None:
            answer.model = cached.model or answer.model
            _replay_pieces(cached.answer, emit_text, answer.pieces)
            answer.usage, answer.finish = TokenUsage(0, 0), "stop"
        elif answer.context is not None and answer.context.fallback is not None:
            _replay_pieces(answer.context.fallback, emit_text, answer.pieces)
            answer.usage, answer.finish = TokenUsage(0, 0), "stop"
        elif answer.context is not None:
            if self._tool_loop is not None:  # live data: the tenant's tools for this intent
                answer.tools = await self._tool_loop.turn(
                    turn.tenant, turn.intent, request.session.metadata, turn.publish, deadline
                )
            answer.usage, answer.finish = await self._generator.generate(
                answer.context.messages,
                answer.model,
                deadline,
                coalescer,
                answer.pieces,
                timings,
                answer.tools,
            )

    async def _complete(self, turn: Turn, answer: _Answer, deadline: float | None) -> None:
        """Citations and usage, the outcome persisted, then `done`."""
        assert turn.timings is not None
        text = answer.text
        usage = answer.usage
        if usage is None:
            prompt = answer.context.messages if answer.context is not None else []
            usage = TokenUsage(
                sum(estimate_tokens(m["content"]) for m in prompt),
                estimate_tokens(text),
                estimated=True,
            )
        sources = self._citations(text, answer.context, answer.cached)
        if answer.tools is not None:  # the live data the answer drew on comes first
            sources = [*answer.tools.citations(text, self._snippet_chars), *sources]
            sources = sources[:MAX_CITATIONS]
        for citation in sources:
            turn.publish(citation=pb.Citation(**citation))
        turn.publish(usage=usage_to_pb(usage))
        turn.result.usage = usage
        finish = answer.finish or "stop"
        turn.result.outcome = "cached" if answer.cached is not None else finish
        record = TurnRecord(
            turn.turn_id,
            "cancelled" if finish == "cancelled" else "done",
            answer=text,
            finish_reason=finish,
            model=answer.model,
            usage={"input": usage.input_tokens, "output": usage.output_tokens},
            citations=tuple(sources),
        )
        summary = answer.context.summary if answer.context is not None else None
        done = pb.TurnDone(
            finish_reason=FINISH_REASONS.get(finish, pb.FINISH_REASON_STOP),
            usage=usage_to_pb(usage),
            timings=turn.timings.to_pb(self._clock()),
        )
        if answer.cached is not None:
            done.cached = True
            done.cache_age.CopyFrom(duration(answer.cached.age))
        terminal = turn.prepare(done=done)
        outcome = await self.finish(
            turn,
            record,
            terminal,
            deadline,
            summary=json.dumps(summary, ensure_ascii=False) if summary else "",
            also=self._cache_store_call(
                turn,
                answer.context,
                record,
                sources,
                used_tools=answer.tools is not None and answer.tools.used_tools,
            ),
            cached=answer.cached is not None,
            tool_calls=answer.tools.records() if answer.tools is not None else (),
        )
        if not _stored_as(outcome, record):
            raise _lease_lost()  # another instance declared this turn failed
        turn.deliver(terminal, logged=True)

    async def _cached_answer(self, turn: Turn, deadline: float | None) -> CacheLookup | None:
        """The cached answer for this turn, waiting for an identical miss in flight if any."""
        lookup, probe = turn.lookup, turn.plan.cache_probe
        if self._cache is None or lookup is None or probe is None:
            return None
        if lookup.status == "follower":
            limit = self._clock() + self._settings.turn_timeout
            lookup = await self._cache.wait(
                probe, lookup.kb_version, limit if deadline is None else min(deadline, limit)
            )
            turn.lookup = lookup
        self._cache.record(lookup)
        self._record_cache_request(lookup.status == "hit")
        return lookup if lookup.status == "hit" else None

    def _citations(
        self, text: str, context: AssembledContext | None, cached: CacheLookup | None
    ) -> list[dict[str, Any]]:
        """The sources the answer cites (all sources in the prompt if it cites none)."""
        if cached is not None and cached.entry is not None:
            return list(cached.entry.citations)[:MAX_CITATIONS]
        if context is None or not context.sources or not text:
            return []
        named = cite.cited(text)
        chosen = [
            src for src in context.sources if (src.chunk.document_title, src.chunk.section) in named
        ] or list(context.sources)
        return [
            {
                "document_title": src.chunk.document_title,
                "document_id": src.chunk.document_id,
                "section": src.chunk.section,
                "snippet": _snippet(src.chunk.text, self._snippet_chars),
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
        *,
        used_tools: bool = False,
    ) -> ScriptCall | None:
        """Store a shareable answer (or free the single-flight lock) with the turn's outcome.

        A turn that called tools is never stored: its answer rests on live (maybe personal) data.
        """
        lookup, probe = turn.lookup, turn.plan.cache_probe
        if self._cache is None or probe is None or lookup is None or lookup.status != "leader":
            return None
        entry = None
        if (
            context is not None
            and context.shareable
            and not used_tools
            and record.status == "done"
            and record.finish_reason == "stop"
            and record.answer
        ):
            entry = CachedAnswer(record.answer, record.model, tuple(citations), dict(record.usage))
            self._cache.stats.stores += 1
        return self._cache.store_call(probe, lookup.kb_version, entry)

    # Retried messages -------------------------------------------------------------

    async def replay(self, turn: Turn, record: TurnRecord) -> None:
        """Answer a retried message with the answer already produced."""
        assert turn.timings is not None
        seq_base = turn.seq
        turn.publish(
            turn_started=pb.TurnStarted(
                client_message_id=turn.client_message_id, model=record.model, replayed=True
            )
        )
        if turn.plan.admission is not None:  # every turn starts with the caller's budget
            turn.publish(rate_limit=rate_limit_status(turn.plan.admission))
        if record.answer:
            turn.timings.first_token = self._clock()
            turn.publish(text_delta=pb.TextDelta(text=record.answer))
        for citation in record.citations[:MAX_CITATIONS]:
            turn.publish(citation=pb.Citation(**citation))
        usage = TokenUsage(record.usage.get("input", 0), record.usage.get("output", 0))
        turn.publish(usage=usage_to_pb(usage))
        turn.result.usage = usage
        turn.result.outcome = "replayed"
        if turn.plan.admission is not None:
            await self.refund(turn.plan.admission)
        turn.publish(
            done=pb.TurnDone(
                finish_reason=FINISH_REASONS.get(record.finish_reason, pb.FINISH_REASON_STOP),
                usage=usage_to_pb(usage),
                timings=turn.timings.to_pb(self._clock()),
            )
        )
        assert turn.seq <= seq_base + REPLAY_EVENTS

    async def follow(self, turn: Turn, deadline: float | None, watch: float) -> bool | None:
        """A turn running on another instance: relay its events from the session's log.

        Events after `turn.seq` are relayed as logged (same seqs) until the
        turn's terminal event (True). While following, the owner is told someone
        watches (`watch` seconds at a time), so its detach grace does not cancel
        it. False when the owner stopped (its lease ran out without a terminal
        event, or the session is gone); None when `deadline` passed first.
        """
        limit = self._clock() + self._settings.turn_timeout
        deadline = limit if deadline is None else min(deadline, limit)
        holding = True
        while self._clock() < deadline:
            watching = int(watch * 1000) if turn.sinks else 0
            exists, holder, logged = await self._store.follow_log(
                turn.tenant, turn.session_id, turn.seq, watching, _LOG_BATCH
            )
            if _relay(turn, logged):
                turn.result.outcome = "followed"
                if turn.plan.admission is not None:
                    await self.refund(turn.plan.admission)
                return True
            if not exists:
                return False
            if holder != turn.turn_id and not logged:
                if not holding:
                    return False  # no lease and nothing new twice in a row: the owner is gone
                holding = False
            else:
                holding = True
            await asyncio.sleep(_JOIN_POLL)
        return None

    async def await_settled(self, turn: Turn, deadline: float) -> bool:
        """Wait while a retried message's turn runs elsewhere with a live lease.

        True once it is no longer running there (answered, failed, or its lease
        ran out): begin again to find out. False when `deadline` passed first.
        """
        key = (turn.tenant, turn.session_id, turn.client_message_id)
        while self._clock() < deadline:
            state = await self._store.turn_state(*key)
            if not state.running_elsewhere(turn.turn_id):
                return True
            await asyncio.sleep(_JOIN_POLL)
        return False

    async def not_completed(self, turn: Turn, error: KoreroError | None = None) -> None:
        """End a turn that never ran here with `error` (default: TURN_NOT_COMPLETED).

        Its event takes a seq reserved now; if Redis cannot give one, it repeats
        the turn's (outside the resumable log, like a rejected frame).
        """
        if error is None:
            error = KoreroError(
                grpc.StatusCode.ABORTED,
                "TURN_NOT_COMPLETED",
                "the earlier attempt of this message did not complete; send it again",
                retryable=True,
            )
        advance = True
        try:
            turn.seq = await self._store.reserve_seqs(turn.tenant, turn.session_id, 1)
        except KoreroError:
            advance = False
        if turn.plan.admission is not None:
            await self.refund(turn.plan.admission)  # no tokens were spent on it here
        turn.result.reason = error.reason
        event = turn.publish(error=error_event_body(error, turn.client_message_id), advance=advance)
        if advance:  # in the log too, so a stream resuming from a cursor sees how it ended
            with contextlib.suppress(KoreroError):
                await self._store.append_events(
                    turn.tenant, turn.session_id, "", [(event.seq, event.SerializeToString())]
                )

    # Endings ------------------------------------------------------------------------

    async def refund(self, admission: Admission) -> None:
        """Give back a turn's token reservation (nothing was spent)."""
        assert self._limiter is not None
        call = self._limiter.settlement(admission, 0)
        if call is not None:
            with contextlib.suppress(KoreroError):
                await self._store.run(call)

    async def finish(
        self,
        turn: Turn,
        record: TurnRecord,
        terminal: pb.Event,
        deadline: float | None,
        *,
        summary: str = "",
        also: ScriptCall | None = None,
        cached: bool = False,
        tool_calls: Sequence[Mapping[str, Any]] = (),
    ) -> FinishOutcome:
        """Persist the outcome and log the terminal event (with any events not yet
        logged) before it is sent; with PostgreSQL configured, then commit the turn
        there (bounded by KORERO_POSTGRES_COMMIT_WAIT; else it waits in the outbox).

        A cache store and the token settlement ride in the same pipeline. When
        Redis does not answer, the outcome is unknown: the finish is sent again
        (alone: it applies once, the others must not run twice) until Redis
        answers, `store_resolve_seconds` pass or the client's deadline comes.
        """
        turn.finishing = True
        calls = [] if also is None else [also]
        admission = turn.plan.admission
        if admission is not None and self._limiter is not None:
            used = turn.result.usage.total_tokens if turn.result.usage is not None else 0
            settle = self._limiter.settlement(admission, used)
            if settle is not None:
                calls.append(settle)
        now = self._clock()
        give_up = now + self._settings.store_resolve_seconds
        if deadline is not None:  # the margin before the client's deadline includes the floor
            give_up = max(min(give_up, deadline), now + _FINISH_FLOOR)
        attempt = 0
        events = [
            *(turn.log.take_unlogged(turn.events) if turn.log is not None else []),
            (terminal.seq, terminal.SerializeToString()),
        ]
        timings = turn.timings.to_dict(self._clock()) if turn.timings is not None else None
        with self._tracer.start_as_current_span("korero.persist"):
            while True:
                try:
                    async with asyncio.timeout(max(0.0, give_up - self._clock())):
                        outcome = await self._store.finish_turn(
                            turn.tenant,
                            turn.session_id,
                            turn.client_message_id,
                            record,
                            terminal.seq,
                            events=events,
                            summary=summary,
                            also=calls if attempt == 0 else (),
                            cached=cached,
                            timings=timings,
                            tool_calls=tool_calls,
                        )
                    if self._outbox is not None and outcome.status != "lost":
                        # `settled` too: a resent finish (the first one timed out
                        # after it was applied) still owes the PostgreSQL commit
                        # before its `done` goes out.
                        await self._outbox.commit(turn.tenant, turn.session_id)
                    return outcome
                except (StoreUnavailableError, TimeoutError) as error:
                    attempt += 1
                    pause = min(_RESOLVE_BACKOFF * attempt, 0.5)
                    if self._clock() + pause >= give_up:
                        turn.unresolved = True
                        log.warning(
                            "event=finish_unresolved turn_id=%s attempts=%d", turn.turn_id, attempt
                        )
                        raise StoreUnavailableError() from error
                    await asyncio.sleep(pause)

    async def fail(self, turn: Turn, error: KoreroError, deadline: float | None = None) -> None:
        """End the turn with `error` (persisted as failed, if the store can be reached).

        If the store says the turn was answered after all (an earlier finish
        whose reply was lost), the turn ends with that answer's `done` instead.
        """
        log.info(
            "event=turn_error turn_id=%s code=%s reason=%s",
            turn.turn_id,
            error.code.name,
            error.reason,
        )
        turn.result.outcome = "error"
        turn.result.reason = error.reason
        record = TurnRecord(turn.turn_id, "failed", finish_reason=error.reason)
        terminal = turn.prepare(error=error_event_body(error, turn.client_message_id))
        if not turn.unresolved:  # else Redis just had its chance: say so within the deadline
            try:
                # Frees the response cache's single-flight lock too, if this turn held it.
                outcome = await self.finish(
                    turn,
                    record,
                    terminal,
                    deadline,
                    also=self._cache_store_call(turn, None, record, []),
                )
            except KoreroError as store_error:
                # The turn still ends with one terminal event; its lease runs out on its own.
                log.warning("event=finish_turn_failed reason=%s", store_error.reason)
            else:
                stored = outcome.stored
                if stored is not None and stored.status == "done":
                    self._done_from_record(turn, stored)
                    return
        turn.deliver(terminal, logged=True)

    def _done_from_record(self, turn: Turn, record: TurnRecord) -> None:
        """`done` for a turn whose stored outcome is an answer."""
        assert turn.timings is not None
        usage = TokenUsage(record.usage.get("input", 0), record.usage.get("output", 0))
        turn.result.outcome = record.finish_reason or "stop"
        turn.result.reason = ""
        turn.result.usage = usage
        turn.publish(
            done=pb.TurnDone(
                finish_reason=FINISH_REASONS.get(record.finish_reason, pb.FINISH_REASON_STOP),
                usage=usage_to_pb(usage),
                timings=turn.timings.to_pb(self._clock()),
            )
        )


def _lease_lost() -> KoreroError:
    return KoreroError(
        grpc.StatusCode.ABORTED,
        "TURN_LEASE_LOST",
        "this turn lost its hold on the session and was not saved; send the message again",
        retryable=True,
    )


def _stored_as(outcome: FinishOutcome, record: TurnRecord) -> bool:
    """Whether the store holds `record`'s outcome (written now or by an earlier send)."""
    if outcome.status == "applied":
        return True
    stored = outcome.stored
    return stored is not None and stored.status == record.status

"""One turn in flight: its events, its subscribers, how it is cancelled.

A turn publishes its events in order to every subscribed sink; a late
subscriber (an idempotent retry joining the turn) first receives the events
published so far, then the rest live. The engine creates turns; the runner
(runner.py) drives one from its first event to its terminal one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from korero.chat.v1 import chat_pb2 as pb
from korero.server.context.cache import CacheLookup, CacheProbe
from korero.server.context.router import RouteDecision
from korero.server.conversation.eventlog import TurnLog
from korero.server.conversation.wire import duration
from korero.server.errors import KoreroError
from korero.server.llm.provider import TokenUsage
from korero.server.policy.ratelimit import Admission

if TYPE_CHECKING:
    from korero.server.conversation.early import EarlyAnswer

__all__ = ["EventSink", "StageTimings", "Turn", "TurnPlan", "TurnResult"]

EventSink = Callable[[pb.Event], None]
"""Receives a turn's events in order; must not block."""


@dataclass
class StageTimings:
    """When each stage of a turn started or took, on the engine's clock."""

    started: float
    session_load: float = 0.0
    context_assembly: float = 0.0
    first_token: float | None = None
    llm_started: float | None = None
    llm_ended: float | None = None

    def to_dict(self, now: float) -> dict[str, float]:
        """Stage durations in seconds (stored with the answer)."""
        out = {
            "session_load": round(self.session_load, 6),
            "context_assembly": round(self.context_assembly, 6),
            "total": round(now - self.started, 6),
        }
        if self.first_token is not None:
            out["time_to_first_token"] = round(self.first_token - self.started, 6)
        return out

    def to_pb(self, now: float) -> pb.StageTimings:
        t = pb.StageTimings(
            session_load=duration(self.session_load),
            context_assembly=duration(self.context_assembly),
            total=duration(now - self.started),
        )
        if self.first_token is not None:
            t.time_to_first_token.CopyFrom(duration(self.first_token - self.started))
        if self.llm_started is not None:
            t.llm.CopyFrom(duration((self.llm_ended or now) - self.llm_started))
        return t


@dataclass(frozen=True)
class TurnPlan:
    """What was decided before the turn started: route, admission, cache probe."""

    route: RouteDecision | None = None
    admission: Admission | None = None
    cache_probe: CacheProbe | None = None
    kb_version: int = 0
    """The tenant's knowledge-base version when the turn began (0: none)."""
    signals: dict[str, float] | None = None
    """Stored with the message for the handoff policy: sentiment, router confidence."""
    early: EarlyAnswer | None = None
    """The upstream request sent before the turn began (conversation/early.py), if any."""


@dataclass
class TurnResult:
    """How the turn ended, for metrics and spans."""

    outcome: str = "error"
    reason: str = ""
    usage: TokenUsage | None = None


@dataclass
class Turn:
    """One turn in flight. Publishes its events to every subscribed sink."""

    tenant: str
    session_id: str
    turn_id: str
    client_message_id: str
    seq: int
    plan: TurnPlan = field(default_factory=TurnPlan)
    lookup: CacheLookup | None = None
    """What the response cache said (updated once a follower's wait ends)."""
    span: trace.Span = trace.INVALID_SPAN
    timings: StageTimings | None = None
    result: TurnResult = field(default_factory=TurnResult)
    events: list[pb.Event] = field(default_factory=list)
    sinks: list[EventSink] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    cancel_reason: KoreroError | None = None
    cancelled_by_client: bool = False
    sentiment: pb.Sentiment | None = None
    """The message's sentiment and trend, sent in `turn_started`."""
    escalation: Any = None
    """Set when the turn hands the conversation to a human (handoff/triggers.py)."""
    finishing: bool = False
    unresolved: bool = False
    """Persisting the outcome failed without an answer from Redis (outcome unknown)."""
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    log: TurnLog | None = None
    """Where published events are logged for replay (None: not logged here)."""
    grace: asyncio.TimerHandle | None = None
    """The detach grace running while no client is attached."""
    following: bool = False
    """This instance relays a turn that runs elsewhere (from the session's log)."""

    @property
    def intent(self) -> str:
        route = self.plan.route
        return route.intent if route is not None else ""

    @property
    def ended(self) -> bool:
        """Whether the terminal event (`done` or `error`) was published."""
        return bool(self.events) and self.events[-1].WhichOneof("kind") in ("done", "error")

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    def subscribe(self, sink: EventSink, after_seq: int = 0) -> None:
        """Send the events so far (those above `after_seq`), then the rest live."""
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        for event in self.events:
            if event.seq > after_seq:
                sink(event)
        if not self.done:
            self.sinks.append(sink)

    def unsubscribe(self, sink: EventSink) -> None:
        with contextlib.suppress(ValueError):
            self.sinks.remove(sink)

    def prepare(self, **kind: Any) -> pb.Event:
        """The next event, numbered but not yet sent (a terminal event is persisted first).

        The number is taken when it is delivered: a prepared event that is dropped
        (its persistence failed) leaves no gap.
        """
        return pb.Event(session_id=self.session_id, turn_id=self.turn_id, seq=self.seq + 1, **kind)

    def deliver(self, event: pb.Event, *, logged: bool = False) -> pb.Event:
        """Send a prepared (or relayed) event to every sink; log it unless `logged`."""
        self.seq = max(self.seq, event.seq)
        self.events.append(event)
        for sink in tuple(self.sinks):
            sink(event)
        if self.log is not None and not logged:
            self.log.push(event)
        return event

    def publish(self, *, advance: bool = True, **kind: Any) -> pb.Event:
        """Send an event to every sink; `advance=False` repeats the last seq (outside the log)."""
        if advance:
            return self.deliver(self.prepare(**kind))
        event = pb.Event(session_id=self.session_id, turn_id=self.turn_id, seq=self.seq, **kind)
        return self.deliver(event, logged=True)

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

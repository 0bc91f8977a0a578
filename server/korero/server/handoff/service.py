"""The handoff service: the engine's hooks, opening handoffs, the queue's upkeep.

The conversation engine calls it (through `conversation.hooks.HandoffHook`)
to score messages, to decide whether a turn escalates, to open the handoff
once that turn has ended, and to relay a customer's message while a human
owns the session. The agent desk (desk.py) calls it for everything an agent
does; those actions are the `DeskActions` mixin (actions.py). Each action
changes the tenant's desk first (one script, with its webhooks), then tells
the customer through the session's relay log. (A little over 400 lines: the
hooks, opening and upkeep share the tenant tick state kept here.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.server.context.router import RouteDecision
from korero.server.conversation.turn import EventSink, Turn
from korero.server.conversation.wire import duration
from korero.server.errors import InvalidArgumentError, KoreroError, NotFoundError
from korero.server.handoff.actions import (
    AgentProfile,
    DeskActions,
    DeskError,
    desk_record,
    facts,
    handoff_payload,
    new_id,
    relay_event,
    trigger_proto,
)
from korero.server.handoff.records import DeskSnapshot, HandoffRecord
from korero.server.handoff.relay import RelayHub, SessionFeed
from korero.server.handoff.sentiment import SentimentAnalyzer, SentimentReading, trend
from korero.server.handoff.store import HandoffStore, RelayItem
from korero.server.handoff.triggers import TRIGGERS, Escalation, EscalationPolicy
from korero.server.handoff.webhooks import WebhookOutbox
from korero.server.report.recorder import Recorder
from korero.server.settings import HandoffSettings
from korero.server.storage.records import StoredMessage
from korero.server.telemetry import Metrics

__all__ = ["AgentProfile", "DeskError", "HandoffService", "trigger_proto"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_STALE_FACTOR = 5  # an agent not seen for this many sweep intervals is taken for gone
_STALE_MS = 10_000  # ... and never sooner: a busy event loop is not a dead agent


class HandoffService(DeskActions):
    """Escalation, relay and the agent desk over one `HandoffStore`."""

    def __init__(
        self,
        *,
        store: HandoffStore,
        hub: RelayHub,
        settings: HandoffSettings,
        outbox: WebhookOutbox,
        analyzer: SentimentAnalyzer | None = None,
        metrics: Metrics | None = None,
        recorder: Recorder | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._store = store
        self._hub = hub
        self._settings = settings
        self._policy = EscalationPolicy(settings)
        self._outbox = outbox
        self._analyzer = analyzer or SentimentAnalyzer()
        self._metrics = metrics
        self._recorder = recorder
        self._now = wall_ms
        self._tenants: dict[str, int] = {}  # tenants this instance keeps ticking: until (ms)
        self._announced: dict[str, int] = {}  # handoff id -> last position told
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def store(self) -> HandoffStore:
        return self._store

    @property
    def hub(self) -> RelayHub:
        return self._hub

    @property
    def settings(self) -> HandoffSettings:
        return self._settings

    @property
    def policy(self) -> EscalationPolicy:
        return self._policy

    @property
    def stale_ms(self) -> int:
        """An agent not heard from for this long is taken for gone (its instance died)."""
        return max(_STALE_MS, int(self._settings.sweep_interval * 1000 * _STALE_FACTOR))

    def now_ms(self) -> int:
        return self._now()

    async def start(self) -> None:
        await self._hub.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="handoff-sweeper")

    def background(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Run `coro` to its end even if its caller is cancelled (kept until done)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=2.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait({self._sweeper}, timeout=2.0)
        await self._hub.close()

    # Engine hooks ---------------------------------------------------------------------

    def signals(self, text: str, route: RouteDecision) -> dict[str, float]:
        """What is stored with a customer message: sentiment and router confidence."""
        return {"sentiment": self._analyzer.score(text), "confidence": route.confidence}

    def reading(
        self, signals: dict[str, float] | None, history: Sequence[StoredMessage]
    ) -> pb.Sentiment | None:
        """The sentiment of a turn's message, with the trend over the last messages."""
        if not signals or "sentiment" not in signals:
            return None
        earlier = [m.sentiment for m in history if m.role == "user" and m.sentiment is not None]
        mean, window = trend([*earlier, signals["sentiment"]], self._settings.sentiment_window)
        return pb.Sentiment(score=signals["sentiment"], trend=mean, window=window)

    def escalation(
        self, turn: Turn, history: Sequence[StoredMessage], *, fallback: bool
    ) -> tuple[str, pb.HandoffRequested] | None:
        """(what the bot says, the handoff_requested body) when this turn escalates."""
        reading = None
        if turn.sentiment is not None:
            reading = SentimentReading(
                turn.sentiment.score, turn.sentiment.trend, turn.sentiment.window
            )
        found = self._policy.evaluate(turn.plan.route, reading, history, fallback=fallback)
        if found is None:
            return None
        turn.escalation = found
        body = pb.HandoffRequested(
            handoff_id=new_id(),
            trigger=found.trigger.proto,
            reason=found.reason,
            message=found.message,
        )
        return found.message, body

    async def escalate(self, turn: Turn, requested: pb.HandoffRequested) -> None:
        """Open the handoff a turn asked for, once its terminal event is out. Never raises."""
        escalation: Escalation = turn.escalation
        try:
            await self._open(
                turn.tenant,
                turn.session_id,
                requested.handoff_id,
                escalation,
                intent=turn.intent,
                turn_id=turn.turn_id,
                announce=None,
            )
        except KoreroError as error:
            log.warning("event=handoff_open_failed reason=%s", error.reason)
        except Exception:
            log.exception("event=handoff_open_failed")

    async def relay(
        self,
        tenant: str,
        session_id: str,
        handoff_id: str,
        message: pb.UserMessage,
        signals: dict[str, float] | None,
        route: RouteDecision,
        sink: EventSink,
    ) -> Turn | None:
        """A customer message while a human owns the session: to the agent, not the bot.

        Returns a finished pseudo-turn whose one event is `message_relayed`
        (None when the handoff ended meanwhile: the caller starts a bot turn).
        """
        history = {
            "role": "user",
            "text": message.text,
            "cmid": message.client_message_id,
            "intent": route.intent,
            **(signals or {}),
        }
        body = {
            "text": message.text,
            "client_message_id": message.client_message_id,
            "ts": self._now(),
            "intent": route.intent,
            **(signals or {}),
        }
        ack = relay_event(
            session_id,
            message_relayed=pb.MessageRelayed(
                handoff_id=handoff_id, client_message_id=message.client_message_id
            ),
        )
        result = await self._store.append(
            tenant,
            session_id,
            "keep",
            handoff_id,
            [
                RelayItem(
                    "customer_message",
                    ack,
                    body=body,
                    history=history,
                    record={
                        "role": "customer",
                        "cmid": message.client_message_id,
                        "text": message.text,
                        "sentiment": (signals or {}).get("sentiment"),
                    },
                )
            ],
            client_message_id=message.client_message_id,
        )
        if result.status == "not_owner":
            return None
        if result.status == "missing":
            raise InvalidArgumentError("SESSION_NOT_FOUND", f"session {session_id!r} has expired")
        seq = result.seqs[0]
        turn = Turn(tenant, session_id, "", message.client_message_id, seq - 1)
        turn.publish(
            message_relayed=pb.MessageRelayed(
                handoff_id=handoff_id, client_message_id=message.client_message_id
            )
        )
        turn.events[-1].turn_id = ""
        turn.finished.set()
        turn.subscribe(sink)
        return turn

    def feed(
        self,
        tenant: str,
        session_id: str,
        after_seq: int,
        deliver: Callable[[pb.Event], None],
        busy: Callable[[], Awaitable[None] | None],
    ) -> SessionFeed:
        """The relay feed of one customer stream."""
        return SessionFeed(
            store=self._store,
            hub=self._hub,
            tenant=tenant,
            session_id=session_id,
            after_seq=after_seq,
            deliver=deliver,
            busy=busy,
        )

    async def request(self, tenant: str, session_id: str, reason: str) -> None:
        """The client's explicit `RequestHandoff`."""
        if not self._policy.enabled("client_request"):
            raise KoreroError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HANDOFF_UNAVAILABLE",
                "handing over to a human is not available here",
            )
        escalation = Escalation(
            TRIGGERS["client_request"],
            "the customer asked for a person" + (f": {reason[:200]}" if reason else ""),
        )
        await self._open(tenant, session_id, new_id(), escalation, intent="", announce=True)

    async def withdraw(self, tenant: str, session_id: str, *, deleted: bool = False) -> bool:
        """The customer leaves the queue (`RequestHandoff.withdraw`, or the session is
        deleted): a handoff no agent has joined ends `abandoned`, the queue and the
        agent it was offered to drop it, the CRM is told, and the bot answers again.

        False when the session has no open handoff; FAILED_PRECONDITION
        `HANDOFF_ALREADY_JOINED` when an agent has joined it.
        """
        draft = await self._store.open_handoff(tenant, session_id)
        if draft is None:
            return False
        if not draft.waiting:
            raise KoreroError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HANDOFF_ALREADY_JOINED",
                "an agent has joined this conversation; it is theirs to hand back",
            )
        now = self._now()
        disposition = "session_deleted" if deleted else ""
        status, record = await self._release(
            tenant,
            now,
            draft,
            "",
            "abandoned",
            disposition,
            note="",
            waited_seconds=round((now - draft.requested) / 1000, 3),
        )
        if status == "joined":  # an agent accepted it meanwhile
            raise KoreroError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HANDOFF_ALREADY_JOINED",
                "an agent has joined this conversation; it is theirs to hand back",
            )
        if status != "ok" or record is None:
            return False  # ended meanwhile
        self._announced.pop(draft.id, None)
        if self._recorder is not None and not deleted:  # a deleted session leaves no row
            self._recorder.handoff_ended(
                facts(tenant, record), record.ended or now, "abandoned", disposition, "", ""
            )
        if not deleted:
            await self._store.append(
                tenant,
                session_id,
                "close",
                draft.id,
                [
                    RelayItem(
                        "ended",
                        relay_event(
                            session_id,
                            handoff_ended=pb.HandoffEnded(
                                handoff_id=draft.id,
                                outcome=pb.HANDOFF_OUTCOME_ABANDONED,
                                message="You've left the queue for a person. "
                                "You're back with our virtual assistant.",
                            ),
                        ),
                    )
                ],
            )
        log.info(
            "event=handoff_abandoned tenant=%s handoff=%s deleted=%s", tenant, draft.id, deleted
        )
        await self.tick(tenant)
        await self.announce_queue(tenant)
        return True

    # Opening and announcing -----------------------------------------------------------

    async def _open(
        self,
        tenant: str,
        session_id: str,
        handoff_id: str,
        escalation: Escalation,
        *,
        intent: str,
        turn_id: str = "",
        announce: bool | None,
    ) -> None:
        items = []
        if announce:
            items.append(
                RelayItem(
                    "requested",
                    relay_event(
                        session_id,
                        handoff_requested=pb.HandoffRequested(
                            handoff_id=handoff_id,
                            trigger=escalation.trigger.proto,
                            reason=escalation.reason,
                            message=escalation.message,
                        ),
                    ),
                )
            )
        claimed = await self._store.append(tenant, session_id, "open", handoff_id, items)
        if claimed.status == "owned":
            return  # a handoff is already open for this session
        if claimed.status == "missing":
            raise NotFoundError("SESSION_NOT_FOUND", f"no session {session_id!r}")
        draft, context = await self._draft(
            tenant, handoff_id, session_id, escalation.trigger.name, escalation.reason, intent
        )
        now = draft.requested
        status, _, existing = await self._store.request(
            tenant,
            now,
            handoff_id,
            session_id,
            desk_record(draft, turn_id=turn_id),
            self._outbox.entries(tenant, "handoff.requested", handoff_payload(draft, context), now),
        )
        if status == "exists":  # the desk already has one: give the session to it
            await self._store.append(tenant, session_id, "close", handoff_id, [])
            await self._store.append(tenant, session_id, "open", existing, [])
            return
        if self._metrics is not None:
            self._metrics.handoffs.labels(escalation.trigger.name).inc()
        if self._recorder is not None:
            self._recorder.handoff_requested(facts(tenant, draft), turn_id)
        log.info(
            "event=handoff_requested tenant=%s handoff=%s trigger=%s queue=%s",
            tenant,
            handoff_id,
            escalation.trigger.name,
            draft.queue,
        )
        self._keep_ticking(tenant)
        await self.tick(tenant)
        await self.announce_queue(tenant)

    def _estimate(self, snapshot: DeskSnapshot, handoff: HandoffRecord, position: int) -> float:
        ewma = snapshot.ewma_wait_ms
        per = ewma / 1000 if ewma is not None else self._settings.default_wait
        agents = snapshot.agents_for(handoff.queue, self._now(), self.stale_ms)
        return per * position / max(1, agents)

    async def announce_queue(self, tenant: str, snapshot: DeskSnapshot | None = None) -> None:
        """Tell every waiting customer whose place changed where they stand."""
        snapshot = snapshot or await self._store.snapshot(tenant)
        jobs = []
        for handoff in snapshot.queued():
            position = snapshot.position(handoff)
            if self._announced.get(handoff.id) == position:
                continue
            self._announced[handoff.id] = position
            queued = pb.HandoffQueued(
                handoff_id=handoff.id,
                position=position,
                estimated_wait=duration(self._estimate(snapshot, handoff, position)),
                queue=handoff.queue,
            )
            jobs.append(
                self._store.append(
                    tenant,
                    handoff.session,
                    "keep",
                    handoff.id,
                    [RelayItem("queued", relay_event(handoff.session, handoff_queued=queued))],
                )
            )
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)

    # Upkeep ---------------------------------------------------------------------------

    def _keep_ticking(self, tenant: str, seconds: float = 3600.0) -> None:
        self._tenants[tenant] = max(self._tenants.get(tenant, 0), self._now() + int(seconds * 1000))

    def watch_tenant(self, tenant: str) -> None:
        """A desk of `tenant` is connected here: keep its queue moving."""
        self._keep_ticking(tenant)

    async def tick(self, tenant: str) -> None:
        """Expire offers and graces, offer waiting conversations, tell requeued customers."""
        s = self._settings
        graced, requeued, offers = await self._store.tick(
            tenant,
            self._now(),
            offer_ms=int(s.offer_timeout * 1000),
            stale_ms=self.stale_ms,
            grace_ms=int(s.agent_grace * 1000),
        )
        for handoff in graced:
            log.info(
                "event=agent_silent tenant=%s handoff=%s agent=%s",
                tenant,
                handoff.id,
                handoff.agent,
            )
            await self._tell_disconnected(tenant, handoff, handoff.agent_name)
        for handoff in requeued:
            self._announced.pop(handoff.id, None)
            log.info("event=handoff_requeued tenant=%s handoff=%s", tenant, handoff.id)
        if requeued:
            await self.announce_queue(tenant)
        for handoff_id, agent_id in offers:
            log.info(
                "event=handoff_offered tenant=%s handoff=%s agent=%s", tenant, handoff_id, agent_id
            )

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._settings.sweep_interval)
            now = self._now()
            for tenant, until in list(self._tenants.items()):
                if until < now:
                    del self._tenants[tenant]
                    continue
                try:
                    await self.tick(tenant)
                except KoreroError as error:
                    log.warning("event=handoff_sweep_failed reason=%s", error.reason)
                except Exception:
                    log.exception("event=handoff_sweep_failed")

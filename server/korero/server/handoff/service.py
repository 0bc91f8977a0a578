"""The handoff service: the engine's hooks, the desk's actions, the queue's upkeep.

The conversation engine calls it (through `conversation.hooks.HandoffHook`)
to score messages, to decide whether a turn escalates, to open the handoff
once that turn has ended, and to relay a customer's message while a human
owns the session. The agent desk (desk.py) calls it for everything an agent
does. Each action changes the tenant's desk first (one script, with its
webhooks), then tells the customer through the session's relay log.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc

from korero.agent.v1 import agent_pb2 as apb
from korero.chat.v1 import chat_pb2 as pb
from korero.server.context.router import RouteDecision
from korero.server.conversation.turn import EventSink, Turn
from korero.server.conversation.wire import duration, message_to_pb, metadata_to_pb, timestamp
from korero.server.errors import InvalidArgumentError, KoreroError, NotFoundError
from korero.server.handoff.records import DeskSnapshot, HandoffRecord
from korero.server.handoff.relay import RelayHub, SessionFeed
from korero.server.handoff.sentiment import SentimentAnalyzer, SentimentReading, trend
from korero.server.handoff.store import HandoffStore, RelayItem, SessionContext
from korero.server.handoff.triggers import TRIGGERS, Escalation, EscalationPolicy
from korero.server.handoff.webhooks import WebhookOutbox
from korero.server.report.recorder import HandoffFacts, Recorder
from korero.server.settings import HandoffSettings
from korero.server.storage.records import StoredMessage
from korero.server.telemetry import Metrics

__all__ = ["AgentProfile", "DeskError", "HandoffService"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_STALE_FACTOR = 5  # an agent not seen for this many sweep intervals is taken for gone
_STALE_MS = 10_000  # ... and never sooner: a busy event loop is not a dead agent
_MAX_TEXT_BYTES = 8000


class DeskError(KoreroError):
    """An agent action the desk refuses (the desk stream stays open)."""


@dataclass(frozen=True)
class AgentProfile:
    """Who an agent is, as the desk knows them."""

    agent_id: str
    display_name: str


def _new_id() -> str:
    return uuid.uuid4().hex


def _event(session_id: str, **kind: Any) -> bytes:
    """A customer-facing event without seq (the relay script numbers it)."""
    return pb.Event(session_id=session_id, **kind).SerializeToString()


def trigger_proto(name: str) -> pb.HandoffTrigger.ValueType:
    trigger = TRIGGERS.get(name)  # type: ignore[call-overload]
    return trigger.proto if trigger is not None else pb.HANDOFF_TRIGGER_UNSPECIFIED


class HandoffService:
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
            handoff_id=_new_id(),
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
        ack = _event(
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
            [RelayItem("customer_message", ack, body=body, history=history)],
            client_message_id=message.client_message_id,
        )
        if result.status == "not_owner":
            return None
        if result.status == "missing":
            raise InvalidArgumentError("SESSION_NOT_FOUND", f"session {session_id!r} has expired")
        seq = result.seqs[0]
        if self._recorder is not None and result.status == "ok":
            self._recorder.handoff_message(
                tenant,
                session_id,
                seq,
                handoff_id,
                "customer",
                "",
                message.client_message_id,
                message.text,
                (signals or {}).get("sentiment"),
                self._now(),
            )
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
        await self._open(tenant, session_id, _new_id(), escalation, intent="", announce=True)

    # Opening and announcing -----------------------------------------------------------

    def _handoff_payload(
        self, record: HandoffRecord, context: SessionContext | None = None, **extra: Any
    ) -> dict[str, Any]:
        """The `handoff` object of a webhook event (see schemas/)."""
        meta = context.metadata if context is not None else {}
        payload: dict[str, Any] = {
            "id": record.id,
            "session_id": record.session,
            "trigger": record.trigger,
            "reason": record.reason,
            "queue": record.queue,
            "requested_at": record.requested,
            "customer": {
                "name": meta.get("customer_name", record.customer),
                "booking_reference": meta.get("booking_reference", ""),
            },
        }
        if record.agent:
            payload["agent"] = {"id": record.agent, "display_name": record.agent_name}
        payload.update(extra)
        return payload

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
                    _event(
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
        context = await self._store.session_context(tenant, session_id)
        if not intent and context is not None:
            intent = next((m.intent for m in reversed(context.history) if m.intent), "")
        now = self._now()
        record = {
            "trigger": escalation.trigger.name,
            "reason": escalation.reason,
            "queue": self._settings.queues.get(intent, "general"),
            "customer": (context.metadata.get("customer_name", "") if context else ""),
            "turn_id": turn_id,
        }
        draft = HandoffRecord(
            handoff_id,
            session_id,
            "queued",
            escalation.trigger.name,
            escalation.reason,
            str(record["queue"]),
            now,
            customer=str(record["customer"]),
        )
        status, _, existing = await self._store.request(
            tenant,
            now,
            handoff_id,
            session_id,
            record,
            self._outbox.entries(
                tenant, "handoff.requested", self._handoff_payload(draft, context), now
            ),
        )
        if status == "exists":  # the desk already has one: give the session to it
            await self._store.append(tenant, session_id, "close", handoff_id, [])
            await self._store.append(tenant, session_id, "open", existing, [])
            return
        if self._metrics is not None:
            self._metrics.handoffs.labels(escalation.trigger.name).inc()
        if self._recorder is not None:
            self._recorder.handoff_requested(_facts(tenant, draft), turn_id)
        log.info(
            "event=handoff_requested tenant=%s handoff=%s trigger=%s queue=%s",
            tenant,
            handoff_id,
            escalation.trigger.name,
            record["queue"],
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
                    [RelayItem("queued", _event(handoff.session, handoff_queued=queued))],
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
            await self._tell(
                tenant,
                handoff,
                agent_left=pb.AgentLeft(
                    handoff_id=handoff.id,
                    agent_display_name=handoff.agent_name,
                    reason="disconnected",
                ),
            )
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

    # Agent actions ----------------------------------------------------------------------

    async def join(
        self, tenant: str, agent: AgentProfile, spec: dict[str, Any], connection: str
    ) -> list[tuple[str, str]]:
        self.watch_tenant(tenant)
        conversations = await self._store.agent_join(
            tenant, self._now(), agent.agent_id, spec, connection
        )
        for handoff_id, before in conversations:
            if before != "grace":
                continue
            handoff = (await self._store.snapshot(tenant)).by_id(handoff_id)
            if handoff is not None:
                await self._tell(
                    tenant,
                    handoff,
                    agent_joined=pb.AgentJoined(
                        handoff_id=handoff_id, agent_display_name=agent.display_name
                    ),
                )
        await self.tick(tenant)
        return conversations

    async def _tell(self, tenant: str, handoff: HandoffRecord, **kind: Any) -> tuple[int, ...]:
        name = next(iter(kind))
        result = await self._store.append(
            tenant,
            handoff.session,
            "keep",
            handoff.id,
            [RelayItem(name, _event(handoff.session, **kind))],
        )
        return result.seqs

    async def _open_handoff(self, tenant: str, handoff_id: str) -> HandoffRecord:
        """The tenant's open handoff `handoff_id`, or `NOT_FOUND HANDOFF_NOT_FOUND`."""
        draft = (await self._store.snapshot(tenant)).by_id(handoff_id)
        if draft is None:
            raise DeskError(
                grpc.StatusCode.NOT_FOUND, "HANDOFF_NOT_FOUND", f"no open handoff {handoff_id!r}"
            )
        return draft

    async def accept(
        self, tenant: str, agent: AgentProfile, handoff_id: str, *, pick: bool = False
    ) -> HandoffRecord:
        draft = await self._open_handoff(tenant, handoff_id)
        now = self._now()
        joined = replace(draft, agent=agent.agent_id, agent_name=agent.display_name)
        status, record, first = await self._store.accept(
            tenant,
            now,
            handoff_id,
            agent.agent_id,
            agent.display_name,
            pick=pick,
            default_wait_ms=int(self._settings.default_wait * 1000),
            outbox=self._outbox.entries(
                tenant,
                "handoff.agent_joined",
                self._handoff_payload(
                    joined, waited_seconds=round((now - draft.requested) / 1000, 3)
                ),
                now,
            ),
        )
        if status == "taken":
            raise DeskError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HANDOFF_TAKEN",
                "another agent has this conversation",
            )
        if status == "not_offered":
            raise DeskError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HANDOFF_NOT_OFFERED",
                "this conversation is not offered to you; pick it to take it over",
            )
        if status in ("missing", "no_agent") or record is None:
            raise DeskError(
                grpc.StatusCode.NOT_FOUND, "HANDOFF_NOT_FOUND", f"no open handoff {handoff_id!r}"
            )
        if status == "already":
            return record
        self._announced.pop(handoff_id, None)
        if first and self._metrics is not None:
            self._metrics.handoff_wait.observe(max(0.0, (record.joined - record.requested) / 1000))
        if first and self._recorder is not None:
            self._recorder.handoff_joined(
                _facts(tenant, record), record.joined, agent.agent_id, agent.display_name
            )
        log.info(
            "event=handoff_accepted tenant=%s handoff=%s agent=%s first=%s",
            tenant,
            handoff_id,
            agent.agent_id,
            first,
        )
        await self._tell(
            tenant,
            record,
            agent_joined=pb.AgentJoined(
                handoff_id=handoff_id, agent_display_name=agent.display_name
            ),
        )
        await self.announce_queue(tenant)
        return record

    async def decline(self, tenant: str, agent: AgentProfile, handoff_id: str) -> None:
        if not await self._store.decline(tenant, self._now(), handoff_id, agent.agent_id):
            raise DeskError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HANDOFF_NOT_OFFERED",
                "this conversation is not offered to you",
            )
        await self.tick(tenant)

    async def pick(
        self, tenant: str, agent: AgentProfile, session_id: str, reason: str
    ) -> HandoffRecord:
        """Take a conversation over: from the queue if it waits there, else from the bot."""
        existing = await self._store.open_handoff(tenant, session_id)
        if existing is not None:
            return await self.accept(tenant, agent, existing.id, pick=True)
        if not self._policy.enabled("agent_pick"):
            raise DeskError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "PICK_DISABLED",
                "taking over conversations from the bot is switched off",
            )
        handoff_id = _new_id()
        why = f"picked by {agent.display_name}" + (f": {reason[:200]}" if reason else "")
        requested = pb.HandoffRequested(
            handoff_id=handoff_id, trigger=pb.HANDOFF_TRIGGER_AGENT_PICK, reason=why
        )
        claimed = await self._store.append(
            tenant,
            session_id,
            "open",
            handoff_id,
            [RelayItem("requested", _event(session_id, handoff_requested=requested))],
        )
        if claimed.status == "missing":
            raise DeskError(
                grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", f"no session {session_id!r}"
            )
        if claimed.status == "owned":
            raise DeskError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HANDOFF_TAKEN",
                "another handoff owns this conversation",
            )
        context = await self._store.session_context(tenant, session_id)
        now = self._now()
        intent = (
            next((m.intent for m in reversed(context.history) if m.intent), "") if context else ""
        )
        record = {
            "trigger": "agent_pick",
            "reason": why,
            "queue": self._settings.queues.get(intent, "general"),
            "customer": context.metadata.get("customer_name", "") if context else "",
        }
        draft = HandoffRecord(
            handoff_id,
            session_id,
            "active",
            "agent_pick",
            why,
            str(record["queue"]),
            now,
            customer=str(record["customer"]),
            agent=agent.agent_id,
            agent_name=agent.display_name,
            joined=now,
        )
        outbox = self._outbox.entries(
            tenant, "handoff.requested", self._handoff_payload(draft, context), now
        ) + self._outbox.entries(
            tenant,
            "handoff.agent_joined",
            self._handoff_payload(draft, context, waited_seconds=0.0),
            now,
        )
        status, made, other = await self._store.request(
            tenant,
            now,
            handoff_id,
            session_id,
            record,
            outbox,
            picked_by=(agent.agent_id, agent.display_name),
        )
        if status != "ok" or made is None:
            await self._store.append(tenant, session_id, "close", handoff_id, [])
            if status == "exists":
                return await self.accept(tenant, agent, other, pick=True)
            raise DeskError(
                grpc.StatusCode.FAILED_PRECONDITION, "AGENT_NOT_JOINED", "join the desk first"
            )
        if self._metrics is not None:
            self._metrics.handoffs.labels("agent_pick").inc()
        if self._recorder is not None:
            facts = _facts(tenant, made)
            self._recorder.handoff_requested(facts)
            self._recorder.handoff_joined(
                facts, made.joined or made.requested, agent.agent_id, agent.display_name
            )
        await self._tell(
            tenant,
            made,
            agent_joined=pb.AgentJoined(
                handoff_id=handoff_id, agent_display_name=agent.display_name
            ),
        )
        return made

    async def send(
        self, tenant: str, agent: AgentProfile, handoff: HandoffRecord, message_id: str, text: str
    ) -> int:
        """The agent's message to the customer; returns its seq on the customer's stream."""
        if not text.strip() or len(text.encode()) > _MAX_TEXT_BYTES:
            raise DeskError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "MESSAGE_INVALID",
                f"a message is 1 to {_MAX_TEXT_BYTES} bytes of text",
            )
        message_id = message_id or _new_id()
        result = await self._store.append(
            tenant,
            handoff.session,
            "keep",
            handoff.id,
            [
                RelayItem(
                    "agent_message",
                    _event(
                        handoff.session,
                        agent_message=pb.AgentMessage(
                            handoff_id=handoff.id,
                            agent_display_name=agent.display_name,
                            text=text,
                            message_id=message_id,
                        ),
                    ),
                    body={"text": text, "message_id": message_id, "agent": agent.agent_id},
                    history={
                        "role": "assistant",
                        "text": text,
                        "cmid": message_id,
                        "agent": agent.display_name,
                    },
                )
            ],
            client_message_id=f"agent:{message_id}",
        )
        if result.status not in ("ok", "duplicate"):
            raise DeskError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HANDOFF_NOT_YOURS",
                "this conversation is no longer yours",
            )
        if self._recorder is not None and result.status == "ok":
            self._recorder.handoff_message(
                tenant,
                handoff.session,
                result.seqs[0],
                handoff.id,
                "agent",
                agent.display_name,
                message_id,
                text,
                None,
                self._now(),
            )
        return result.seqs[0]

    async def release(
        self,
        tenant: str,
        agent: AgentProfile,
        handoff_id: str,
        mode: int,
        disposition: str,
        note: str,
    ) -> HandoffRecord:
        """Hand back to the bot, or close: the customer is told, the CRM too."""
        close = mode == apb.RELEASE_MODE_CLOSE
        outcome = "closed" if close else "returned_to_bot"
        draft = await self._open_handoff(tenant, handoff_id)
        now = self._now()
        status, record = await self._store.release(
            tenant,
            now,
            handoff_id,
            agent.agent_id,
            outcome,
            disposition,
            self._outbox.entries(
                tenant,
                "handoff.closed",
                self._handoff_payload(
                    draft,
                    outcome=outcome,
                    disposition=disposition,
                    note=note,
                    closed_at=now,
                    handled_seconds=round((now - (draft.joined or now)) / 1000, 3),
                ),
                now,
            ),
        )
        if status != "ok" or record is None:
            raise DeskError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HANDOFF_NOT_YOURS",
                "this conversation is not yours to release",
            )
        self._announced.pop(handoff_id, None)
        if self._recorder is not None:
            self._recorder.handoff_ended(
                _facts(tenant, record),
                record.ended or now,
                outcome,
                disposition,
                agent.agent_id,
                agent.display_name,
            )
        words = (
            "This conversation has been closed. Thank you for contacting us."
            if close
            else "You're back with our virtual assistant. Ask me anything."
        )
        await self._store.append(
            tenant,
            record.session,
            "close",
            handoff_id,
            [
                RelayItem(
                    "agent_left",
                    _event(
                        record.session,
                        agent_left=pb.AgentLeft(
                            handoff_id=handoff_id,
                            agent_display_name=agent.display_name,
                            reason="closed" if close else "handed back",
                        ),
                    ),
                ),
                RelayItem(
                    "ended",
                    _event(
                        record.session,
                        handoff_ended=pb.HandoffEnded(
                            handoff_id=handoff_id,
                            outcome=pb.HANDOFF_OUTCOME_CLOSED
                            if close
                            else pb.HANDOFF_OUTCOME_RETURNED_TO_BOT,
                            disposition=disposition,
                            message=words,
                        ),
                    ),
                ),
            ],
        )
        log.info(
            "event=handoff_released tenant=%s handoff=%s outcome=%s", tenant, handoff_id, outcome
        )
        await self.tick(tenant)
        return record

    async def leave(self, tenant: str, agent: AgentProfile, connection: str) -> None:
        """The agent's desk stream ended: their conversations wait out the grace period."""
        graced = await self._store.agent_leave(
            tenant, self._now(), agent.agent_id, connection, int(self._settings.agent_grace * 1000)
        )
        for handoff in graced:
            await self._tell(
                tenant,
                handoff,
                agent_left=pb.AgentLeft(
                    handoff_id=handoff.id,
                    agent_display_name=agent.display_name,
                    reason="disconnected",
                ),
            )
        self._keep_ticking(tenant)
        await self.tick(tenant)

    async def heartbeat(
        self,
        tenant: str,
        agent: AgentProfile,
        connection: str,
        *,
        status: str = "",
        skills: dict[str, int] | None = None,
    ) -> bool:
        """Availability, skills, or "still here"; False when this connection was replaced."""
        restored = await self._store.agent_update(
            tenant, self._now(), agent.agent_id, connection, status=status, skills=skills
        )
        for handoff in restored or ():
            await self._tell(
                tenant,
                handoff,
                agent_joined=pb.AgentJoined(
                    handoff_id=handoff.id, agent_display_name=agent.display_name
                ),
            )
        return restored is not None

    # The context packet -----------------------------------------------------------------

    async def context_packet(
        self, tenant: str, handoff: HandoffRecord
    ) -> tuple[apb.ContextPacket, str]:
        """Everything an agent needs, and the relay cursor it is current to."""
        context = await self._store.session_context(tenant, handoff.session)
        packet = apb.ContextPacket(
            handoff_id=handoff.id,
            session_id=handoff.session,
            trigger=trigger_proto(handoff.trigger),
            reason=handoff.reason,
            queue=handoff.queue,
            request_time=timestamp(handoff.requested / 1000),
            waited=duration(((handoff.joined or self._now()) - handoff.requested) / 1000),
        )
        if context is None:
            return packet, "0"
        users = [m for m in context.history if m.role == "user"]
        scores = [m.sentiment for m in users if m.sentiment is not None]
        packet.customer.CopyFrom(metadata_to_pb(context.metadata))
        packet.intent_history.extend(m.intent for m in users if m.intent)
        packet.sentiment_history.extend(scores)
        if scores:
            mean, window = trend(scores, self._settings.sentiment_window)
            packet.sentiment.CopyFrom(pb.Sentiment(score=scores[-1], trend=mean, window=window))
        packet.summary = _summary(context, handoff)
        packet.transcript.extend(message_to_pb(m) for m in context.history)
        seen: set[tuple[str, str]] = set()
        for record in context.turns:
            for citation in record.citations:
                key = (str(citation.get("document_title")), str(citation.get("section")))
                if key not in seen:
                    seen.add(key)
                    packet.citations.append(pb.Citation(**citation))
        return packet, context.relay_tail


def _summary(context: SessionContext, handoff: HandoffRecord) -> str:
    """A few plain sentences an agent can read at a glance."""
    meta = context.metadata
    who = meta.get("customer_name") or "The customer"
    booking = f" (booking {meta['booking_reference']})" if meta.get("booking_reference") else ""
    users = [m for m in context.history if m.role == "user"]
    topics: list[str] = []
    for m in users:
        if m.intent and m.intent not in topics:
            topics.append(m.intent)
    parts = [
        f"{who}{booking} sent {len(users)} message{'s' if len(users) != 1 else ''}"
        + (f" ({', '.join(t.replace('_', ' ') for t in topics)})" if topics else "")
        + "."
    ]
    if context.summary.get("text"):
        parts.append(f"Earlier: {context.summary['text']}")
    if users:
        last = " ".join(users[-1].text.split())
        parts.append(f'Last message: "{last[:200]}{"…" if len(last) > 200 else ""}"')
    parts.append(f"Escalated: {handoff.reason}.")
    return " ".join(parts)


def _facts(tenant: str, record: HandoffRecord) -> HandoffFacts:
    """The columns every `handoffs` row starts with, from the handoff's record."""
    return HandoffFacts(
        tenant,
        record.id,
        record.session,
        record.trigger,
        record.reason,
        record.queue,
        record.requested,
    )

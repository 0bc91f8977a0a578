"""What an agent does at the desk: join, accept, decline, pick, send, release, leave.

`HandoffService` (service.py) is built from this mixin: the engine's hooks, the
opening of handoffs and the queue's upkeep live there, the agent's actions and
the context packet an agent gets live here. Each action changes the tenant's
desk first (one script, with its webhooks), then tells the customer through
the session's relay log (`_tell`). The helpers both halves use are here too.
(Longer than 400 lines: nine actions of about 40 lines each, every one a desk
script, its webhook payload, its relay event and its report row.)
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import grpc

from korero.agent.v1 import agent_pb2 as apb
from korero.chat.v1 import chat_pb2 as pb
from korero.server.conversation.wire import duration, message_to_pb, metadata_to_pb, timestamp
from korero.server.errors import KoreroError
from korero.server.handoff.records import DeskSnapshot, HandoffRecord
from korero.server.handoff.sentiment import trend
from korero.server.handoff.store import HandoffStore, RelayItem, SessionContext
from korero.server.handoff.triggers import TRIGGERS, EscalationPolicy
from korero.server.handoff.webhooks import WebhookOutbox
from korero.server.report.recorder import HandoffFacts, Recorder
from korero.server.settings import HandoffSettings
from korero.server.telemetry import Metrics

__all__ = [
    "AgentProfile",
    "DeskActions",
    "DeskError",
    "desk_record",
    "facts",
    "handoff_payload",
    "new_id",
    "relay_event",
    "trigger_proto",
]

log = logging.getLogger(__name__)

MAX_TEXT_BYTES = 8000


class DeskError(KoreroError):
    """An agent action the desk refuses (the desk stream stays open)."""


@dataclass(frozen=True)
class AgentProfile:
    """Who an agent is, as the desk knows them."""

    agent_id: str
    display_name: str


def new_id() -> str:
    return uuid.uuid4().hex


def relay_event(session_id: str, **kind: Any) -> bytes:
    """A customer-facing event without seq (the relay script numbers it)."""
    return pb.Event(session_id=session_id, **kind).SerializeToString()


def trigger_proto(name: str) -> pb.HandoffTrigger.ValueType:
    trigger = TRIGGERS.get(name)  # type: ignore[call-overload]
    return trigger.proto if trigger is not None else pb.HANDOFF_TRIGGER_UNSPECIFIED


def desk_record(draft: HandoffRecord, **extra: Any) -> dict[str, Any]:
    """What a desk script takes to open a handoff (DESK_REQUEST, DESK_PICK)."""
    return {
        "trigger": draft.trigger,
        "reason": draft.reason,
        "queue": draft.queue,
        "customer": draft.customer,
        **extra,
    }


def handoff_payload(
    record: HandoffRecord, context: SessionContext | None = None, **extra: Any
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


class DeskActions:
    """The agent's actions; mixed into `HandoffService`, which provides what is declared here."""

    _store: HandoffStore
    _settings: HandoffSettings
    _policy: EscalationPolicy
    _outbox: WebhookOutbox
    _metrics: Metrics | None
    _recorder: Recorder | None
    _now: Callable[[], int]
    _announced: dict[str, int]

    if TYPE_CHECKING:  # HandoffService's upkeep (service.py)

        def _keep_ticking(self, tenant: str, seconds: float = 3600.0) -> None: ...

        def watch_tenant(self, tenant: str) -> None: ...

        async def tick(self, tenant: str) -> None: ...

        async def announce_queue(
            self, tenant: str, snapshot: DeskSnapshot | None = None
        ) -> None: ...

    async def _release(
        self,
        tenant: str,
        now: int,
        draft: HandoffRecord,
        agent_id: str,
        outcome: str,
        disposition: str,
        **facts: Any,
    ) -> tuple[str, HandoffRecord | None]:
        """End `draft` in the desk ('' agent: only while nobody has joined), with its
        `handoff.closed` event for the CRM in the same step."""
        event = handoff_payload(
            draft, outcome=outcome, disposition=disposition, closed_at=now, **facts
        )
        return await self._store.release(
            tenant,
            now,
            draft.id,
            agent_id,
            outcome,
            disposition,
            self._outbox.entries(tenant, "handoff.closed", event, now),
        )

    async def _draft(
        self,
        tenant: str,
        handoff_id: str,
        session_id: str,
        trigger: str,
        reason: str,
        intent: str = "",
    ) -> tuple[HandoffRecord, SessionContext | None]:
        """A new handoff's record (queued, requested now) and the session's context.

        Its queue is the one for `intent`, or for the session's last intent.
        """
        context = await self._store.session_context(tenant, session_id)
        if not intent and context is not None:
            intent = next((m.intent for m in reversed(context.history) if m.intent), "")
        draft = HandoffRecord(
            handoff_id,
            session_id,
            "queued",
            trigger,
            reason,
            self._settings.queues.get(intent, "general"),
            self._now(),
            customer=context.metadata.get("customer_name", "") if context else "",
        )
        return draft, context

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
                await self._tell_joined(tenant, handoff, agent.display_name)
        await self.tick(tenant)
        return conversations

    async def _tell_joined(self, tenant: str, handoff: HandoffRecord, agent_name: str) -> None:
        """The customer hears that `agent_name` (re)joined the conversation."""
        await self._tell(
            tenant,
            handoff,
            agent_joined=pb.AgentJoined(handoff_id=handoff.id, agent_display_name=agent_name),
        )

    async def _tell_disconnected(
        self, tenant: str, handoff: HandoffRecord, agent_name: str
    ) -> None:
        """The customer hears that the agent went away (the grace period has begun)."""
        await self._tell(
            tenant,
            handoff,
            agent_left=pb.AgentLeft(
                handoff_id=handoff.id, agent_display_name=agent_name, reason="disconnected"
            ),
        )

    async def _tell(self, tenant: str, handoff: HandoffRecord, **kind: Any) -> tuple[int, ...]:
        name = next(iter(kind))
        result = await self._store.append(
            tenant,
            handoff.session,
            "keep",
            handoff.id,
            [RelayItem(name, relay_event(handoff.session, **kind))],
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
                handoff_payload(joined, waited_seconds=round((now - draft.requested) / 1000, 3)),
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
                facts(tenant, record), record.joined, agent.agent_id, agent.display_name
            )
        log.info(
            "event=handoff_accepted tenant=%s handoff=%s agent=%s first=%s",
            tenant,
            handoff_id,
            agent.agent_id,
            first,
        )
        await self._tell_joined(tenant, record, agent.display_name)
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
        handoff_id = new_id()
        why = f"picked by {agent.display_name}" + (f": {reason[:200]}" if reason else "")
        requested = pb.HandoffRequested(
            handoff_id=handoff_id, trigger=pb.HANDOFF_TRIGGER_AGENT_PICK, reason=why
        )
        claimed = await self._store.append(
            tenant,
            session_id,
            "open",
            handoff_id,
            [RelayItem("requested", relay_event(session_id, handoff_requested=requested))],
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
        draft, context = await self._draft(tenant, handoff_id, session_id, "agent_pick", why)
        now = draft.requested
        draft = replace(
            draft, state="active", agent=agent.agent_id, agent_name=agent.display_name, joined=now
        )
        outbox = self._outbox.entries(
            tenant, "handoff.requested", handoff_payload(draft, context), now
        ) + self._outbox.entries(
            tenant,
            "handoff.agent_joined",
            handoff_payload(draft, context, waited_seconds=0.0),
            now,
        )
        status, made, other = await self._store.request(
            tenant,
            now,
            handoff_id,
            session_id,
            desk_record(draft),
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
            made_facts = facts(tenant, made)
            self._recorder.handoff_requested(made_facts)
            self._recorder.handoff_joined(
                made_facts, made.joined or made.requested, agent.agent_id, agent.display_name
            )
        await self._tell_joined(tenant, made, agent.display_name)
        return made

    async def send(
        self, tenant: str, agent: AgentProfile, handoff: HandoffRecord, message_id: str, text: str
    ) -> int:
        """The agent's message to the customer; returns its seq on the customer's stream."""
        if not text.strip() or len(text.encode()) > MAX_TEXT_BYTES:
            raise DeskError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "MESSAGE_INVALID",
                f"a message is 1 to {MAX_TEXT_BYTES} bytes of text",
            )
        message_id = message_id or new_id()
        result = await self._store.append(
            tenant,
            handoff.session,
            "keep",
            handoff.id,
            [
                RelayItem(
                    "agent_message",
                    relay_event(
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
                    record={
                        "role": "agent",
                        "author": agent.display_name,
                        "cmid": message_id,
                        "text": text,
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
        status, record = await self._release(
            tenant,
            now,
            draft,
            agent.agent_id,
            outcome,
            disposition,
            note=note,
            handled_seconds=round((now - (draft.joined or now)) / 1000, 3),
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
                facts(tenant, record),
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
                    relay_event(
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
                    relay_event(
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
            await self._tell_disconnected(tenant, handoff, agent.display_name)
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
            await self._tell_joined(tenant, handoff, agent.display_name)
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


def facts(tenant: str, record: HandoffRecord) -> HandoffFacts:
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

"""One agent's desk, whatever carries it (the gRPC `Connect` stream, `/ws/agent`).

Like `transport.chat_session.ChatSession` for customers: the transport reads
frames and calls `handle`, and sends what `outbound()` yields. The desk keeps
the agent's view in step with the tenant's desk in Redis by *reconciling*
whenever the desk channel announces a change (and at least every sweep): the
queue as it is, offers made to this agent, conversations that are this
agent's (accepted, picked, or given back after a reconnect). For each of
those it follows the session's relay log from the cursor its context packet
was read at, so every customer message reaches the agent exactly once per
assignment, whichever instance the customer is connected to. (About 400
lines: one agent's view and its reconciliation, read top to bottom.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from korero.agent.v1 import agent_pb2 as apb
from korero.chat.v1 import chat_pb2 as pb
from korero.server.conversation.wire import timestamp
from korero.server.errors import InvalidArgumentError, KoreroError
from korero.server.handoff.records import DeskSnapshot, HandoffRecord
from korero.server.handoff.service import AgentProfile, HandoffService, trigger_proto

__all__ = ["AgentDesk"]

log = logging.getLogger(__name__)

_END = object()


def _availability(value: int) -> str:
    return "away" if value == apb.AVAILABILITY_AWAY else "available"


@dataclass
class _Assigned:
    record: HandoffRecord
    cursor: str


class AgentDesk:
    """One connected agent."""

    def __init__(
        self,
        service: HandoffService,
        tenant: str,
        subject: str | None,
        heartbeat_interval: float,
    ) -> None:
        self._service = service
        self._store = service.store
        self.tenant = tenant
        self._subject = subject
        self._heartbeat_interval = heartbeat_interval
        self.agent: AgentProfile | None = None
        self._skills: tuple[str, ...] = ()
        self._connection = uuid.uuid4().hex
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._offers: set[str] = set()
        self._assigned: dict[str, _Assigned] = {}
        self._resumed: set[str] = set()
        self._releasing: set[str] = set()
        """Released by this desk right now: it says `ended` itself, with the outcome."""
        self._declining: set[str] = set()
        """Declined by this desk right now: it says `offer_withdrawn` (declined) itself."""
        self._queue_seen: tuple[Any, ...] | None = None
        self._desk_dirty = True
        self._dirty_sessions: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._watched: dict[str, Any] = {}
        self._active = False

    # Frames in ---------------------------------------------------------------------------

    async def open(self, join: apb.JoinDesk) -> None:
        """Sign the agent in (the first frame)."""
        agent_id = self._subject or join.agent_id.strip()
        if not agent_id:
            raise InvalidArgumentError(
                "AGENT_ID_MISSING", "`join.agent_id` is required when the credential names no one"
            )
        name = join.display_name.strip() or agent_id
        self.agent = AgentProfile(agent_id, name[:64])
        self._skills = tuple(sorted({s.strip() for s in join.skills if s.strip()}))
        spec = {
            "name": self.agent.display_name,
            "skills": dict.fromkeys(self._skills, 1),
            "max": max(1, join.max_conversations or 1),
            "status": _availability(join.availability),
        }
        conversations = await self._service.join(self.tenant, self.agent, spec, self._connection)
        self._resumed = {hid for hid, _ in conversations}
        self._emit(
            joined=apb.DeskJoined(
                agent_id=agent_id, display_name=self.agent.display_name, skills=self._skills
            )
        )
        self._service.hub.watch(self.tenant, None, self._desk_changed)
        self._tasks = [
            asyncio.create_task(self._work(), name=f"desk-{agent_id}"),
            asyncio.create_task(self._beat(), name=f"desk-beat-{agent_id}"),
        ]
        log.info("event=agent_joined tenant=%s agent=%s", self.tenant, agent_id)

    async def handle(self, request: apb.ConnectRequest) -> None:
        """Act on one frame after `join`; a refused action becomes a `DeskError` event."""
        kind = request.WhichOneof("kind")
        body = getattr(request, kind) if kind else None
        handoff_id = str(getattr(body, "handoff_id", ""))
        actions: dict[str, Callable[[Any], Awaitable[None]]] = {
            "accept": self._accept,
            "decline": self._decline,
            "pick": self._pick,
            "message": self._message,
            "release": self._release,
            "availability": self._availability,
        }
        action = actions.get(kind or "")
        try:
            if action is None:
                if kind == "join":
                    raise InvalidArgumentError(
                        "DESK_ALREADY_JOINED", "`join` is only the first frame"
                    )
                raise InvalidArgumentError("REQUEST_EMPTY", "the request sets no kind")
            await action(body)
        except KoreroError as error:
            self._emit(
                error=apb.DeskError(
                    code=error.code.value[0],
                    reason=error.reason,
                    message=error.message,
                    handoff_id=handoff_id,
                )
            )
        self._desk_changed()

    @property
    def _me(self) -> AgentProfile:
        assert self.agent is not None
        return self.agent

    async def _accept(self, body: apb.AcceptConversation) -> None:
        await self._service.accept(self.tenant, self._me, body.handoff_id)

    async def _decline(self, body: apb.DeclineConversation) -> None:
        handoff_id = body.handoff_id
        self._declining.add(handoff_id)
        try:
            await self._service.decline(self.tenant, self._me, handoff_id)
        finally:
            self._declining.discard(handoff_id)
        if handoff_id in self._offers:
            self._offers.discard(handoff_id)
            self._emit(offer_withdrawn=apb.OfferWithdrawn(handoff_id=handoff_id, reason="declined"))

    async def _pick(self, body: apb.PickConversation) -> None:
        await self._service.pick(self.tenant, self._me, body.session_id, body.reason)

    async def _message(self, body: apb.SendAgentMessage) -> None:
        assigned = self._mine(body.handoff_id)
        seq = await self._service.send(
            self.tenant, self._me, assigned.record, body.message_id, body.text
        )
        self._emit(
            message_sent=apb.AgentMessageSent(
                handoff_id=body.handoff_id, message_id=body.message_id, seq=seq
            )
        )

    async def _release(self, body: apb.ReleaseConversation) -> None:
        handoff_id = body.handoff_id
        self._mine(handoff_id)
        self._releasing.add(handoff_id)
        try:
            record = await self._service.release(
                self.tenant, self._me, handoff_id, body.mode, body.disposition, body.note
            )
        finally:
            self._releasing.discard(handoff_id)
        self._drop(handoff_id)
        closed = record.outcome == "closed"
        self._emit(
            ended=apb.ConversationEnded(
                handoff_id=handoff_id,
                outcome=pb.HANDOFF_OUTCOME_CLOSED if closed else pb.HANDOFF_OUTCOME_RETURNED_TO_BOT,
                reason="closed" if closed else "handed back to the bot",
            )
        )

    async def _availability(self, body: apb.SetAvailability) -> None:
        skills = None
        if body.skills:
            self._skills = tuple(sorted({s for s in body.skills if s}))
            skills = dict.fromkeys(self._skills, 1)
        await self._service.heartbeat(
            self.tenant,
            self._me,
            self._connection,
            status=_availability(body.availability),
            skills=skills,
        )
        await self._service.tick(self.tenant)

    def _mine(self, handoff_id: str) -> _Assigned:
        assigned = self._assigned.get(handoff_id)
        if assigned is None:
            raise KoreroError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HANDOFF_NOT_YOURS",
                f"conversation {handoff_id!r} is not assigned to you",
            )
        return assigned

    # Keeping in step ---------------------------------------------------------------------

    def _desk_changed(self) -> None:
        self._desk_dirty = True
        self._wake.set()

    def _session_waker(self, session_id: str) -> Any:
        def wake() -> None:
            self._dirty_sessions.add(session_id)
            self._wake.set()

        return wake

    async def _work(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._service.settings.sweep_interval)
            self._wake.clear()
            try:
                await self._reconcile()
                while self._dirty_sessions:
                    session = self._dirty_sessions.pop()
                    for handoff_id, assigned in list(self._assigned.items()):
                        if assigned.record.session == session:
                            await self._read(handoff_id, assigned)
            except KoreroError as error:
                log.warning("event=desk_sync_failed reason=%s", error.reason)
                self._desk_dirty = True
            except Exception:
                log.exception("event=desk_sync_failed")
                self._desk_dirty = True

    async def _beat(self) -> None:
        assert self.agent is not None
        while True:
            await asyncio.sleep(self._service.settings.sweep_interval)
            with contextlib.suppress(KoreroError):
                if not await self._service.heartbeat(self.tenant, self.agent, self._connection):
                    return  # this connection was replaced or has left

    async def _reconcile(self) -> None:
        assert self.agent is not None
        self._desk_dirty = False
        snapshot = await self._store.snapshot(self.tenant)
        me = self.agent.agent_id
        self._show_queue(snapshot)
        mine = {
            h.id: h for h in snapshot.handoffs if h.agent == me and h.state in ("active", "grace")
        }
        offered = {
            h.id: h for h in snapshot.handoffs if h.state == "offered" and h.offered_to == me
        }
        for handoff_id, handoff in offered.items():
            if handoff_id not in self._offers:
                packet, _ = await self._service.context_packet(self.tenant, handoff)
                self._offers.add(handoff_id)
                self._emit(
                    offered=apb.ConversationOffered(
                        context=packet, expire_time=timestamp(handoff.offer_until / 1000)
                    )
                )
        for handoff_id in sorted(self._offers - offered.keys() - self._declining):
            self._offers.discard(handoff_id)
            if handoff_id not in mine:
                now = snapshot.by_id(handoff_id)
                # gone before anyone joined: the customer left (or was deleted)
                reason = "abandoned" if now is None else "expired" if now.waiting else "taken"
                self._emit(offer_withdrawn=apb.OfferWithdrawn(handoff_id=handoff_id, reason=reason))
        for handoff_id, handoff in mine.items():
            if handoff_id in self._assigned:
                self._assigned[handoff_id].record = handoff
                continue
            packet, cursor = await self._service.context_packet(self.tenant, handoff)
            assigned = _Assigned(handoff, cursor)
            self._assigned[handoff_id] = assigned
            wake = self._session_waker(handoff.session)
            self._watched[handoff_id] = wake
            self._service.hub.watch(self.tenant, handoff.session, wake)
            self._emit(
                assigned=apb.ConversationAssigned(
                    context=packet, resumed=handoff_id in self._resumed
                )
            )
            await self._read(handoff_id, assigned)
        for handoff_id in sorted(self._assigned.keys() - mine.keys() - self._releasing):
            self._drop(handoff_id)
            self._emit(ended=apb.ConversationEnded(handoff_id=handoff_id, reason="no longer yours"))

    def _show_queue(self, snapshot: DeskSnapshot) -> None:
        waiting = [h for h in snapshot.queued() if h.queue == "general" or h.queue in self._skills]
        available = sum(1 for a in snapshot.agents if a.status == "available")
        seen = (tuple((h.id, h.state, h.offered_to) for h in waiting), available)
        if seen == self._queue_seen:
            return
        self._queue_seen = seen
        self._emit(
            queue=apb.QueueChanged(
                conversations=[queued_entry(snapshot, h) for h in waiting],
                agents_available=available,
            )
        )

    async def _read(self, handoff_id: str, assigned: _Assigned) -> None:
        """Customer messages of an assigned conversation, after its cursor."""
        entries = await self._store.read_relay(
            self.tenant, assigned.record.session, assigned.cursor
        )
        for entry in entries:
            assigned.cursor = entry.entry_id
            if entry.kind != "customer_message" or entry.handoff_id != handoff_id:
                continue
            body = entry.body
            message = apb.CustomerMessage(
                handoff_id=handoff_id,
                session_id=assigned.record.session,
                text=str(body.get("text", "")),
                client_message_id=str(body.get("client_message_id", "")),
                create_time=timestamp(float(body.get("ts", 0)) / 1000),
                seq=entry.seq,
            )
            if isinstance(body.get("sentiment"), int | float):
                message.sentiment.score = float(body["sentiment"])
            self._emit(customer_message=message)

    def _drop(self, handoff_id: str) -> None:
        assigned = self._assigned.pop(handoff_id, None)
        wake = self._watched.pop(handoff_id, None)
        if assigned is not None and wake is not None:
            self._service.hub.unwatch(self.tenant, assigned.record.session, wake)

    # Frames out --------------------------------------------------------------------------

    def _emit(self, **kind: Any) -> None:
        event = apb.DeskEvent(**kind)
        event.time.GetCurrentTime()
        self._out.put_nowait(event)

    async def outbound(self) -> AsyncIterator[apb.DeskEvent]:
        """Events to send, until `end`; a heartbeat on a quiet stream."""
        while True:
            try:
                item = await asyncio.wait_for(self._out.get(), self._heartbeat_interval)
            except TimeoutError:
                yield apb.DeskEvent(heartbeat=apb.DeskHeartbeat())
                continue
            if item is _END:
                return
            yield item

    def end(self) -> None:
        self._out.put_nowait(_END)

    async def close(self) -> None:
        """The stream is gone: stop, and let the agent's conversations wait out the grace."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # let them stop before the leave (the leave script refuses them after)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(self._tasks, timeout=1.0)
        self._service.hub.unwatch(self.tenant, None, self._desk_changed)
        for handoff_id in list(self._assigned):
            self._drop(handoff_id)
        if self.agent is not None:
            # Its own task: the transport's handler may be cancelled again while this
            # runs, and the customers must still hear that their agent is gone.
            leaving = self._service.background(
                self._service.leave(self.tenant, self.agent, self._connection)
            )
            with contextlib.suppress(KoreroError, asyncio.CancelledError):
                await asyncio.shield(leaving)
            log.info("event=agent_left tenant=%s agent=%s", self.tenant, self.agent.agent_id)


def queued_entry(snapshot: DeskSnapshot, handoff: HandoffRecord) -> apb.QueuedConversation:
    """A waiting handoff as the desk API shows it."""
    return apb.QueuedConversation(
        handoff_id=handoff.id,
        session_id=handoff.session,
        queue=handoff.queue,
        trigger=trigger_proto(handoff.trigger),
        reason=handoff.reason,
        request_time=timestamp(handoff.requested / 1000),
        position=snapshot.position(handoff),
        customer_name=handoff.customer,
        offered_to=handoff.offered_to,
    )

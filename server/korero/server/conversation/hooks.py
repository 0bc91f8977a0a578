"""The seam between a turn and the human handoff (handoff/service.py implements it).

The engine asks for a message's signals before the turn begins (they are
stored with it) and hands a message to `relay` when the session store says a
human owns the session. The runner asks for the sentiment reading before
`turn_started`, asks `escalation` once the prompt (or cached answer) is known
and, when the turn escalated, calls `escalate` after its terminal event.
A full-duplex stream follows the session's relay `feed` and passes on the
client's explicit `request` for a person.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from korero.chat.v1 import chat_pb2 as pb
from korero.server.context.router import RouteDecision
from korero.server.conversation.turn import EventSink, Turn
from korero.server.storage.records import StoredMessage

__all__ = ["HandoffHook", "RelayFeed"]


class RelayFeed(Protocol):
    """Delivers a session's handoff events and agent messages to one stream."""

    @property
    def active(self) -> bool:
        """The session had relay traffic since the stream opened."""
        ...

    async def catch_up(self) -> None: ...

    def close(self) -> None: ...


class HandoffHook(Protocol):
    def signals(self, text: str, route: RouteDecision) -> dict[str, float]: ...

    def reading(
        self, signals: dict[str, float] | None, history: Sequence[StoredMessage]
    ) -> pb.Sentiment | None: ...

    def escalation(
        self, turn: Turn, history: Sequence[StoredMessage], *, fallback: bool
    ) -> tuple[str, pb.HandoffRequested] | None: ...

    async def escalate(self, turn: Turn, requested: pb.HandoffRequested) -> None: ...

    async def relay(
        self,
        tenant: str,
        session_id: str,
        handoff_id: str,
        message: pb.UserMessage,
        signals: dict[str, float] | None,
        route: RouteDecision,
        sink: EventSink,
    ) -> Turn | None: ...

    def feed(
        self,
        tenant: str,
        session_id: str,
        after_seq: int,
        deliver: Callable[[pb.Event], None],
        busy: Callable[[], Awaitable[None] | None],
    ) -> RelayFeed: ...

    async def request(self, tenant: str, session_id: str, reason: str) -> None: ...

    async def withdraw(self, tenant: str, session_id: str, *, deleted: bool = False) -> bool:
        """End the session's handoff while it waits in the queue (abandoned)."""
        ...

"""Serving or draining: one switch that every transport's open sessions hear.

On SIGTERM `app.py` calls `begin_drain`: new streams are refused with
`SERVER_SHUTTING_DOWN`, idle sessions end at once and busy ones after their
turn's terminal event (see `ChatSession.drain`).
"""

from __future__ import annotations

from korero.server.errors import ShuttingDownError
from korero.server.transport.chat_session import ChatSession

__all__ = ["Lifecycle"]


class Lifecycle:
    """Serving or draining; tells open sessions when the server starts to drain."""

    def __init__(self) -> None:
        self.draining = False
        self._sessions: set[ChatSession] = set()

    @property
    def open_streams(self) -> int:
        return len(self._sessions)

    def check_open(self) -> None:
        if self.draining:
            raise ShuttingDownError()

    def register(self, session: ChatSession) -> None:
        self._sessions.add(session)

    def unregister(self, session: ChatSession) -> None:
        self._sessions.discard(session)

    def begin_drain(self) -> None:
        self.draining = True
        for session in self._sessions:
            session.drain()

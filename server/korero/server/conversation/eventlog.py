"""A turn's events on their way into the session's event log (the replay log).

Events are sent to the client first and logged after, at most one batch
every `FLUSH_INTERVAL` (one Redis round trip each, at most one in flight), so
logging never delays a delta and a turn shorter than the interval costs no
round trip at all: the turn's finish writes whatever is still unlogged
together with its terminal event (`take_unlogged`), so the log is complete
when the turn releases the session. A resumed stream replays from this log;
a stream following the turn from another instance lags by up to the interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from korero.chat.v1 import chat_pb2 as pb
from korero.server.errors import KoreroError
from korero.server.storage.sessions import SessionStore

__all__ = ["TurnLog"]

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.1
"""Seconds between appends of a running turn's events to the log."""


class TurnLog:
    """Appends one turn's events to the session's log, in order, in the background."""

    def __init__(self, store: SessionStore, tenant: str, session_id: str, holder: str) -> None:
        self._store = store
        self._tenant = tenant
        self._session_id = session_id
        self._holder = holder  # the turn id holding the session ("" for a replay)
        self._pending: list[pb.Event] = []
        self._task: asyncio.Task[None] | None = None
        self.logged = 0
        """The last seq known to be in the log."""
        self.closed = False

    def push(self, event: pb.Event) -> None:
        if self.closed:
            return
        self._pending.append(event)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(FLUSH_INTERVAL)
        while self._pending and not self.closed:
            batch, self._pending = self._pending, []
            try:
                await self._store.append_events(
                    self._tenant, self._session_id, self._holder, _raw(batch)
                )
            except KoreroError as error:
                # The turn's finish writes what is still unlogged; nothing is lost here.
                log.warning("event=event_log_append_failed reason=%s", error.reason)
                self._pending = batch + self._pending
                return
            self.logged = max(self.logged, batch[-1].seq)
            await asyncio.sleep(FLUSH_INTERVAL)

    def take_unlogged(self, events: Sequence[pb.Event]) -> list[tuple[int, bytes]]:
        """Stop logging in the background; the events of `events` not known to be logged."""
        self.closed = True
        return _raw([e for e in events if e.seq > self.logged])

    async def drain(self, within: float = 2.0) -> None:
        """Wait for the batch in flight and the rest (replays log only in the background)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self._task is not None and not self._task.done():
                    await asyncio.shield(self._task)
                    if self._pending and not self.closed:
                        self._task = asyncio.get_running_loop().create_task(self._flush())
        self.closed = True


def _raw(events: Sequence[pb.Event]) -> list[tuple[int, bytes]]:
    return [(e.seq, e.SerializeToString()) for e in events]

"""A session's long-term side: PostgreSQL behind the Redis hot copy.

`SessionRecords` brings a session that Redis lost back from PostgreSQL
(whole, or not at all), reads a session Redis no longer has, pages history
beyond the Redis window, and deletes a session's rows. The engine uses it
only when PostgreSQL is configured.
"""

from __future__ import annotations

import logging

from korero.server.errors import HistoryUnavailableError, NotFoundError
from korero.server.settings import EngineSettings
from korero.server.storage.history import HistoryStore
from korero.server.storage.outbox import OutboxWriter
from korero.server.storage.paging import (
    decode_message_cursor,
    encode_message_cursor,
    merge_pages,
    message_key,
)
from korero.server.storage.records import SessionRecord, StoredMessage
from korero.server.storage.sessions import SessionStore

__all__ = ["SessionRecords"]

log = logging.getLogger(__name__)


class SessionRecords:
    """PostgreSQL's copy of the sessions, seen from the engine."""

    def __init__(
        self,
        store: SessionStore,
        history: HistoryStore,
        outbox: OutboxWriter | None,
        settings: EngineSettings,
    ) -> None:
        self._store = store
        self._history = history
        self._outbox = outbox
        self._settings = settings

    async def rehydrate(self, tenant: str, session_id: str) -> bool:
        """Bring a session missing from Redis back whole from PostgreSQL; False if unknown there.

        The session's own outbox (if Redis still has it: the session expired
        while PostgreSQL was away) is written first; then a new epoch is claimed,
        which fences off writes read from a Redis that crashed; then Redis is
        filled from PostgreSQL. Its seq continues above every seq PostgreSQL
        knows was handed out. True also when another stream claimed the epoch
        first (it is restoring the session).
        """
        if self._outbox is not None and not await self._outbox.commit(tenant, session_id):
            raise HistoryUnavailableError("the session's pending writes could not be stored")
        stored = await self._history.get_session(tenant, session_id)
        if stored is None:
            return False
        epoch = await self._history.claim_epoch(tenant, session_id, stored.epoch)
        if epoch is None:
            return True
        messages, records = await self._history.recent(
            tenant, session_id, self._settings.history_max_messages
        )
        await self._store.rehydrate(
            tenant, session_id, stored, messages, records, seq=stored.seq_high, epoch=epoch
        )
        log.info(
            "event=session_rehydrated tenant=%s messages=%d epoch=%d", tenant, len(messages), epoch
        )
        return True

    async def session(self, tenant: str, session_id: str) -> SessionRecord | None:
        """The session as PostgreSQL has it (for one Redis no longer holds)."""
        stored = await self._history.get_session(tenant, session_id)
        if stored is None:
            return None
        return SessionRecord(
            tenant=tenant,
            session_id=session_id,
            metadata=stored.metadata,
            created_at=stored.created_at,
            updated_at=stored.updated_at,
            last_seq=stored.seq_high,
            turn_count=stored.turn_count,
            message_count=stored.message_count,
        )

    async def page(
        self, tenant: str, session_id: str, size: int, page_token: str
    ) -> tuple[list[StoredMessage], str]:
        """A page of PostgreSQL's history merged with the Redis window (newest, maybe unwritten).

        If PostgreSQL cannot be reached, the page comes from the Redis window alone.
        """
        after = decode_message_cursor(page_token)
        exists, window = await self._store.history_window(tenant, session_id)
        older: list[StoredMessage] = []
        try:
            older = await self._history.messages_after(tenant, session_id, after, size + 1)
            known = exists or bool(older) or after is not None
            if not known:
                known = await self._history.get_session(tenant, session_id) is not None
        except HistoryUnavailableError:
            if not exists:
                raise
            known = True
        if not known:
            raise NotFoundError("SESSION_NOT_FOUND", f"no session {session_id!r}")
        page = merge_pages(older, window, after, size + 1)
        more = len(page) > size
        page = page[:size]
        return page, encode_message_cursor(message_key(page[-1])) if more and page else ""

    async def delete(self, tenant: str, session_id: str) -> bool:
        """Delete the session's rows; False when there were none."""
        return await self._history.delete_session(tenant, session_id)

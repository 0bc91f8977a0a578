"""Handoff records, written to PostgreSQL in batches, off the chat path.

The handoff service calls `handoff_*` (no I/O: the record goes into a
bounded in-memory queue); one task writes whatever is
queued every `_FLUSH` seconds in one transaction. While PostgreSQL is away,
records wait (up to `_MAX_PENDING`, then the oldest are dropped and counted);
a chat never waits for it. The tables are those of migration
`storage/migrations/0002_handoffs.sql`. What is said in a conversation — the
bot's turns, and the customer's and agent's messages while a person owns it
(`handoff_messages`) — is not here: it reaches PostgreSQL through the session
outbox (storage/outbox.py), written in the same Redis step as the message, so
a process that dies before a flush loses none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

__all__ = ["HandoffFacts", "Recorder"]

log = logging.getLogger(__name__)

_FLUSH = 0.5
_MAX_PENDING = 50_000

_REQUESTED = """
INSERT INTO handoffs (tenant, handoff_id, session_id, trigger, reason, queue, requested_at,
                      turn_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (tenant, handoff_id) DO NOTHING
"""
_JOINED = """
INSERT INTO handoffs (tenant, handoff_id, session_id, trigger, reason, queue, requested_at,
                      joined_at, agent_id, agent_name)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (tenant, handoff_id) DO UPDATE
SET joined_at = COALESCE(handoffs.joined_at, EXCLUDED.joined_at),
    agent_id = EXCLUDED.agent_id, agent_name = EXCLUDED.agent_name
"""
_ENDED = """
INSERT INTO handoffs (tenant, handoff_id, session_id, trigger, reason, queue, requested_at,
                      ended_at, outcome, disposition, agent_id, agent_name)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (tenant, handoff_id) DO UPDATE
SET ended_at = EXCLUDED.ended_at, outcome = EXCLUDED.outcome,
    disposition = EXCLUDED.disposition
"""


# As the outbox writer does (storage/history.py): the sessions' deletion locks first,
# in key order, then their tombstones — a row queued before a DeleteSession and
# flushed after it is dropped, never written back.
_LOCK_SESSIONS = """
SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest($1::text[]) AS k
"""
_TOMBSTONED = """
SELECT tenant, session_id FROM session_tombstones
WHERE (tenant, session_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""


def _at(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


@dataclass(frozen=True, slots=True)
class HandoffFacts:
    """What every row of the `handoffs` table starts with: the handoff as requested."""

    tenant: str
    handoff_id: str
    session_id: str
    trigger: str
    reason: str
    queue: str
    requested_ms: int

    def args(self) -> tuple[Any, ...]:
        """The first seven columns of `_REQUESTED`, `_JOINED` and `_ENDED`, in order."""
        return (
            self.tenant,
            self.handoff_id,
            self.session_id,
            self.trigger,
            self.reason,
            self.queue,
            _at(self.requested_ms),
        )


@dataclass(frozen=True)
class _Row:
    sql: str
    args: tuple[Any, ...]
    """`handoffs` columns: tenant, handoff id, session id, ..."""

    @property
    def session(self) -> tuple[str, str]:
        return (self.args[0], self.args[2])


class Recorder:
    """Batches records into PostgreSQL."""

    def __init__(self, url: str, *, pool_size: int = 4, timeout: float = 2.0) -> None:
        self._url = url
        self._pool_size = pool_size
        self._timeout = timeout
        self._pending: deque[_Row] = deque()
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.dropped = 0
        self.written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="report-recorder")

    async def close(self) -> None:
        """Write what is pending (briefly), then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), self._timeout)
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), self._timeout)

    # Records (no I/O) -----------------------------------------------------------------

    def _add(self, sql: str, *args: Any) -> None:
        if len(self._pending) >= _MAX_PENDING:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(_Row(sql, args))

    def handoff_requested(self, handoff: HandoffFacts, turn_id: str = "") -> None:
        self._add(_REQUESTED, *handoff.args(), turn_id)

    def handoff_joined(
        self, handoff: HandoffFacts, joined_ms: int, agent_id: str, agent_name: str
    ) -> None:
        self._add(_JOINED, *handoff.args(), _at(joined_ms), agent_id, agent_name)

    def handoff_ended(
        self,
        handoff: HandoffFacts,
        ended_ms: int,
        outcome: str,
        disposition: str,
        agent_id: str,
        agent_name: str,
    ) -> None:
        self._add(
            _ENDED, *handoff.args(), _at(ended_ms), outcome, disposition, agent_id, agent_name
        )

    # Writing ----------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            await asyncio.sleep(_FLUSH)
            try:
                await self.flush()
                backoff = 1.0
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning(
                    "event=recorder_write_failed error=%s pending=%d retry_in=%.0fs",
                    type(exc).__name__,
                    len(self._pending),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)

    async def flush(self) -> None:
        """Write every pending record now, in order, in one transaction."""
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=1, max_size=self._pool_size, timeout=self._timeout
            )
        batch = list(self._pending)
        started = time.monotonic()
        keys = sorted({row.session for row in batch})
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await conn.execute(
                _LOCK_SESSIONS, [f"{t}\t{s}" for t, s in keys], timeout=self._timeout
            )
            gone = {
                (r["tenant"], r["session_id"])
                for r in await conn.fetch(
                    _TOMBSTONED, [k[0] for k in keys], [k[1] for k in keys], timeout=self._timeout
                )
            }
            for row in batch:
                if row.session not in gone:
                    await conn.execute(row.sql, *row.args, timeout=self._timeout)
        for _ in batch:
            self._pending.popleft()
        self.written += len(batch)
        log.debug(
            "event=recorder_flushed rows=%d ms=%.1f",
            len(batch),
            (time.monotonic() - started) * 1000,
        )

"""Sessions and messages in PostgreSQL: the system of record.

Redis holds each session's hot state; what a turn stores there also goes into
the session's outbox (`outbox.py`), which the `OutboxWriter` applies here with
idempotent upserts. Every row carries its tenant and every statement below is
scoped by it (`WHERE tenant = $1`), so a tenant can never read, page into or
delete another tenant's rows.

Driver: asyncpg, because the server is asyncio end to end and asyncpg is an
asyncio-native driver with its own pool, prepared-statement cache and binary
protocol (no libpq), and `executemany` pipelines a batch in one round trip.
psycopg 3 would do too; its advantage (full typing) is covered by
`asyncpg-stubs` for mypy.

Every asyncpg (or socket) failure crosses one boundary, `postgres_boundary()`,
and becomes `UNAVAILABLE` `HISTORY_UNAVAILABLE` (retryable). (About 400
lines: one SQL statement per read and write, each next to its row decoding.)
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from korero.server.errors import HistoryUnavailableError, KoreroError
from korero.server.settings import PostgresSettings
from korero.server.storage.paging import MessageKey
from korero.server.storage.records import StoredMessage, TurnRecord, tool_calls_of

log = logging.getLogger(__name__)

__all__ = [
    "HistorySession",
    "HistoryStore",
    "OutboxBatch",
    "postgres_boundary",
]


_CAUGHT = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@asynccontextmanager
async def postgres_boundary() -> AsyncIterator[None]:
    """Translate PostgreSQL failures raised inside the block (a `KoreroError` passes through)."""
    try:
        yield
    except KoreroError:
        raise
    except _CAUGHT as exc:
        raise HistoryUnavailableError(f"history store unavailable ({type(exc).__name__})") from exc


@dataclass(frozen=True)
class HistorySession:
    """A session as PostgreSQL knows it."""

    tenant: str
    session_id: str
    metadata: dict[str, Any]
    created_at: float
    updated_at: float
    turn_count: int
    seq_high: int
    message_count: int
    summary: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0


@dataclass
class OutboxBatch:
    """Rows to upsert, gathered from outbox entries of one or more sessions.

    Each message row is tagged with the epoch of the entry it came from; rows of
    an epoch older than the session's epoch in PostgreSQL are refused (fencing).
    """

    sessions: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    users: list[tuple[int, tuple[Any, ...]]] = field(default_factory=list)
    answers: list[tuple[int, tuple[Any, ...]]] = field(default_factory=list)
    handoff_messages: list[tuple[int, tuple[Any, ...]]] = field(default_factory=list)
    """Customer and agent messages while a person owned the session (handoff/)."""

    def session(self, tenant: str, session_id: str, ts: float, epoch: int) -> dict[str, Any]:
        row = self.sessions.get((tenant, session_id))
        if row is None:
            row = {
                "metadata": None,
                "meta_version": "",
                "created_at": ts,
                "updated_at": ts,
                "turn_count": 0,
                "seq_high": 0,
                "summary": None,
                "epoch": epoch,
            }
            self.sessions[(tenant, session_id)] = row
        row["created_at"] = min(row["created_at"], ts)
        row["updated_at"] = max(row["updated_at"], ts)
        row["epoch"] = max(row["epoch"], epoch)
        return row

    def __len__(self) -> int:
        return len(self.sessions) + len(self.users) + len(self.answers) + len(self.handoff_messages)


def _ts(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


_UPSERT_SESSION = """
INSERT INTO sessions AS s (tenant, session_id, metadata, meta_version, created_at, updated_at,
                           turn_count, seq_high, summary, epoch)
VALUES ($1, $2, COALESCE($3::jsonb, '{}'::jsonb), $4, $5, $6, $7, $8, $9::jsonb, $10)
ON CONFLICT (tenant, session_id) DO UPDATE SET
    metadata = CASE WHEN $3::jsonb IS NOT NULL AND EXCLUDED.meta_version > s.meta_version
                    THEN EXCLUDED.metadata ELSE s.metadata END,
    meta_version = GREATEST(s.meta_version, EXCLUDED.meta_version),
    created_at = LEAST(s.created_at, EXCLUDED.created_at),
    updated_at = GREATEST(s.updated_at, EXCLUDED.updated_at),
    turn_count = GREATEST(s.turn_count, EXCLUDED.turn_count),
    seq_high = GREATEST(s.seq_high, EXCLUDED.seq_high),
    summary = COALESCE(EXCLUDED.summary, s.summary)
WHERE EXCLUDED.epoch >= s.epoch
"""

# Writes and deletions of one session take the same transaction-scoped lock,
# always in key order, so a deletion and a write of rows read before it never
# interleave.
_LOCK_KEYS = """
SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest($1::text[]) AS k
"""

# A message relayed while a person owned the session; its seq is its key.
_INSERT_HANDOFF_MESSAGE = """
INSERT INTO handoff_messages (tenant, session_id, seq, handoff_id, role, author,
                              client_message_id, text, sentiment, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (tenant, session_id, seq) DO NOTHING
"""

_TOMBSTONED = """
SELECT tenant, session_id FROM session_tombstones
WHERE (tenant, session_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""

_LOCK_SESSIONS = """
SELECT tenant, session_id, epoch FROM sessions
WHERE (tenant, session_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY tenant, session_id FOR UPDATE
"""

# A user message keeps the place of its first turn; a retry of a failed turn does not move it.
_INSERT_USER = """
INSERT INTO messages (tenant, session_id, turn_no, role, turn_id, client_message_id, text,
                      intent, created_at)
VALUES ($1, $2, $3, 'user', $4, $5, $6, $7, $8)
ON CONFLICT (tenant, session_id, client_message_id) WHERE role = 'user' DO NOTHING
"""

_INSERT_ANSWER = """
INSERT INTO messages (tenant, session_id, turn_no, role, turn_id, client_message_id, text,
                      model, finish_reason, usage, citations, timings, cached, created_at,
                      tool_calls)
VALUES ($1, $2, $3, 'assistant', $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb, $11::jsonb, $12, $13,
        $14::jsonb)
ON CONFLICT DO NOTHING
"""

_MESSAGE_COLUMNS = (
    "role, text, turn_id, turn_no, client_message_id, intent, created_at, model, finish_reason,"
    " usage, citations, tool_calls"
)


class HistoryStore:
    """Sessions and messages of every tenant, each statement scoped by its tenant."""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    @classmethod
    async def connect(cls, settings: PostgresSettings) -> HistoryStore:
        """A store over a lazily filled pool: the server starts even while PostgreSQL is down."""
        assert settings.url is not None
        pool = await asyncpg.create_pool(
            settings.url,
            min_size=0,
            max_size=settings.pool_size,
            timeout=settings.timeout,
            command_timeout=settings.timeout,
            max_inactive_connection_lifetime=60.0,
        )
        return cls(pool, settings.timeout)

    async def close(self) -> None:
        """Close the pool; a connection not released in time (a write stuck on a lock, a
        server that stopped answering) is cut instead of holding the shutdown."""
        try:
            await asyncio.wait_for(self._pool.close(), max(1.0, 2 * self._timeout))
        except TimeoutError:
            log.warning("event=postgres_pool_close_timeout action=terminated")
            self._pool.terminate()

    async def ping(self) -> None:
        async with postgres_boundary(), self._pool.acquire(timeout=self._timeout) as conn:
            await conn.fetchval("SELECT 1")

    # Writes (the outbox writer) ---------------------------------------------------

    async def apply(self, batch: OutboxBatch) -> None:
        """Upsert a batch in one transaction; applying it twice changes nothing.

        The batch's sessions are locked first (in key order); rows of a deleted
        session are dropped, and so are rows of an epoch older than their
        session's: a rehydration, which claims a new epoch under the same lock,
        never races a write read from a Redis that crashed.
        """
        keys = sorted(batch.sessions)
        sessions_rows = [
            (
                tenant,
                session_id,
                row["metadata"],
                row["meta_version"],
                _ts(row["created_at"]),
                _ts(row["updated_at"]),
                row["turn_count"],
                row["seq_high"],
                row["summary"],
                row["epoch"],
            )
            for (tenant, session_id), row in sorted(batch.sessions.items())
        ]
        async with (
            postgres_boundary(),
            self._pool.acquire(timeout=self._timeout) as conn,
            conn.transaction(),
        ):
            await conn.execute(_LOCK_KEYS, [_lock_key(t, s) for t, s in keys])
            gone = {
                (r["tenant"], r["session_id"])
                for r in await conn.fetch(_TOMBSTONED, [k[0] for k in keys], [k[1] for k in keys])
            }
            sessions = [row for row in sessions_rows if (row[0], row[1]) not in gone]
            current = {
                (r["tenant"], r["session_id"]): r["epoch"]
                for r in await conn.fetch(
                    _LOCK_SESSIONS, [k[0] for k in keys], [k[1] for k in keys]
                )
            }

            def fresh(epoch: int, row: tuple[Any, ...]) -> bool:
                key = (row[0], row[1])
                return key not in gone and epoch >= int(current.get(key, 0))

            if sessions:
                await conn.executemany(_UPSERT_SESSION, sessions)
            users = [row for epoch, row in batch.users if fresh(epoch, row)]
            if users:
                await conn.executemany(_INSERT_USER, users)
            answers = [row for epoch, row in batch.answers if fresh(epoch, row)]
            if answers:
                await conn.executemany(_INSERT_ANSWER, answers)
            relayed = [row for epoch, row in batch.handoff_messages if fresh(epoch, row)]
            if relayed:
                await conn.executemany(_INSERT_HANDOFF_MESSAGE, relayed)

    async def claim_epoch(self, tenant: str, session_id: str, seen: int) -> int | None:
        """Start a rehydration: the session's next epoch, or None if another one claimed it."""
        async with postgres_boundary(), self._pool.acquire(timeout=self._timeout) as conn:
            epoch: int | None = await conn.fetchval(
                "UPDATE sessions SET epoch = epoch + 1"
                " WHERE tenant = $1 AND session_id = $2 AND epoch = $3 RETURNING epoch",
                tenant,
                session_id,
                seen,
            )
        return epoch

    # Reads --------------------------------------------------------------------------

    async def get_session(self, tenant: str, session_id: str) -> HistorySession | None:
        async with postgres_boundary(), self._pool.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(
                "SELECT s.*, (SELECT count(*) FROM messages m WHERE m.tenant = s.tenant"
                " AND m.session_id = s.session_id) AS message_count"
                " FROM sessions s WHERE s.tenant = $1 AND s.session_id = $2",
                tenant,
                session_id,
            )
        if row is None:
            return None
        return HistorySession(
            tenant=tenant,
            session_id=session_id,
            metadata=json.loads(row["metadata"]) if row["metadata"] else {},
            created_at=row["created_at"].timestamp(),
            updated_at=row["updated_at"].timestamp(),
            turn_count=row["turn_count"],
            seq_high=row["seq_high"],
            message_count=row["message_count"],
            summary=json.loads(row["summary"]) if row["summary"] else {},
            epoch=row["epoch"],
        )

    async def messages_after(
        self, tenant: str, session_id: str, after: MessageKey | None, limit: int
    ) -> list[StoredMessage]:
        """Up to `limit` messages after `after` (None: from the start), oldest first."""
        turn, order = after if after is not None else (-1, 1)
        async with postgres_boundary(), self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"  # noqa: S608 - fixed column list
                " WHERE tenant = $1 AND session_id = $2"
                " AND (turn_no, (role = 'assistant')::int) > ($3, $4)"
                " ORDER BY turn_no, (role = 'assistant') LIMIT $5",
                tenant,
                session_id,
                turn,
                order,
                limit,
            )
        return [_message(r) for r in rows]

    async def recent(
        self, tenant: str, session_id: str, limit: int
    ) -> tuple[list[StoredMessage], dict[str, TurnRecord]]:
        """The latest `limit` messages, oldest first, and the turn records of answered messages."""
        async with postgres_boundary(), self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"  # noqa: S608 - fixed column list
                " WHERE tenant = $1 AND session_id = $2"
                " ORDER BY turn_no DESC, (role = 'assistant') DESC LIMIT $3",
                tenant,
                session_id,
                limit,
            )
        rows = list(reversed(rows))
        records: dict[str, TurnRecord] = {}
        for answer in rows:
            if answer["role"] != "assistant" or not answer["client_message_id"]:
                continue
            usage = json.loads(answer["usage"]) if answer["usage"] else {}
            citations = json.loads(answer["citations"]) if answer["citations"] else []
            records[answer["client_message_id"]] = TurnRecord(
                answer["turn_id"],
                "done",
                answer=answer["text"],
                finish_reason=answer["finish_reason"],
                model=answer["model"],
                usage=usage if isinstance(usage, dict) else {},
                citations=tuple(c for c in citations if isinstance(c, dict)),
            )
        return [_message(r) for r in rows], records

    # Deletion and retention -------------------------------------------------------------

    async def delete_session(self, tenant: str, session_id: str) -> bool:
        """Delete a session, its messages and its handoffs (with what the customer and
        the agent wrote), leaving a tombstone that refuses late writes of the session;
        False when there was nothing to delete."""
        async with (
            postgres_boundary(),
            self._pool.acquire(timeout=self._timeout) as conn,
            conn.transaction(),
        ):
            await conn.execute(_LOCK_KEYS, [_lock_key(tenant, session_id)])
            await conn.execute(
                "INSERT INTO session_tombstones (tenant, session_id) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                tenant,
                session_id,
            )
            for table in ("messages", "handoff_messages", "handoffs"):  # ours: no injection
                await conn.execute(
                    f"DELETE FROM {table} WHERE tenant = $1 AND session_id = $2",  # noqa: S608
                    tenant,
                    session_id,
                )
            status = await conn.execute(
                "DELETE FROM sessions WHERE tenant = $1 AND session_id = $2", tenant, session_id
            )
        return status != "DELETE 0"

    async def prune_tombstones(self, older_than: int) -> int:
        """Forget deletions older than `older_than` seconds (no write can be that late)."""
        async with postgres_boundary(), self._pool.acquire(timeout=self._timeout) as conn:
            status = await conn.execute(
                "DELETE FROM session_tombstones"
                " WHERE deleted_at < now() - make_interval(secs => $1)",
                float(older_than),
            )
        return int(status.split()[-1])

    async def stale_sessions(
        self, tenant: str, idle_seconds: int, limit: int = 1000
    ) -> Sequence[str]:
        """Ids of the tenant's sessions not updated for `idle_seconds` (at most `limit`)."""
        async with postgres_boundary(), self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT session_id FROM sessions WHERE tenant = $1"
                " AND updated_at < now() - make_interval(secs => $2) ORDER BY updated_at LIMIT $3",
                tenant,
                float(idle_seconds),
                limit,
            )
        return [r["session_id"] for r in rows]


def _lock_key(tenant: str, session_id: str) -> str:
    return f"{tenant}\t{session_id}"


def _message(row: asyncpg.Record) -> StoredMessage:
    user = row["role"] == "user"
    return StoredMessage(
        row["role"],
        row["text"],
        row["turn_id"],
        row["client_message_id"] if user else "",
        row["created_at"].timestamp(),
        row["intent"] or "",
        tool_calls=tool_calls_of(json.loads(row["tool_calls"])) if row["tool_calls"] else (),
    )

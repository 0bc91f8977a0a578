"""Turn facts and handoff records, written to PostgreSQL in batches, off the chat path.

The engine and the handoff service call `turn` / `handoff_*` (no I/O: the
record goes into a bounded in-memory queue); one task writes whatever is
queued every `_FLUSH` seconds in one transaction. While PostgreSQL is away,
records wait (up to `_MAX_PENDING`, then the oldest are dropped and counted);
a chat never waits for it. The tables are those of migration
`storage/migrations/0002_handoffs.sql`.
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

from korero.server.conversation.turn import Turn

__all__ = ["Recorder"]

log = logging.getLogger(__name__)

_FLUSH = 0.5
_MAX_PENDING = 50_000

_TURN = """
INSERT INTO turn_facts (tenant, session_id, turn_id, created_at, intent, outcome, reason,
                        ttft_ms, duration_ms, input_tokens, output_tokens, cached, sentiment,
                        escalated)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
ON CONFLICT (tenant, session_id, turn_id) DO NOTHING
"""
_REQUESTED = """
INSERT INTO handoffs (tenant, handoff_id, session_id, trigger, reason, queue, requested_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
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


def _at(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


@dataclass(frozen=True)
class _Row:
    sql: str
    args: tuple[Any, ...]


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

    def turn(
        self,
        *,
        tenant: str,
        session_id: str,
        turn_id: str,
        intent: str,
        outcome: str,
        reason: str,
        ttft_ms: float | None,
        duration_ms: float,
        input_tokens: int,
        output_tokens: int,
        sentiment: float | None,
        escalated: bool,
    ) -> None:
        self._add(
            _TURN,
            tenant,
            session_id,
            turn_id,
            datetime.now(tz=UTC),
            intent,
            outcome,
            reason,
            ttft_ms,
            duration_ms,
            input_tokens,
            output_tokens,
            outcome == "cached",
            sentiment,
            escalated,
        )

    def handoff_requested(
        self,
        tenant: str,
        handoff_id: str,
        session_id: str,
        trigger: str,
        reason: str,
        queue: str,
        requested_ms: int,
    ) -> None:
        self._add(
            _REQUESTED, tenant, handoff_id, session_id, trigger, reason, queue, _at(requested_ms)
        )

    def handoff_joined(
        self,
        tenant: str,
        handoff_id: str,
        session_id: str,
        trigger: str,
        reason: str,
        queue: str,
        requested_ms: int,
        joined_ms: int,
        agent_id: str,
        agent_name: str,
    ) -> None:
        self._add(
            _JOINED,
            tenant,
            handoff_id,
            session_id,
            trigger,
            reason,
            queue,
            _at(requested_ms),
            _at(joined_ms),
            agent_id,
            agent_name,
        )

    def handoff_ended(
        self,
        tenant: str,
        handoff_id: str,
        session_id: str,
        trigger: str,
        reason: str,
        queue: str,
        requested_ms: int,
        ended_ms: int,
        outcome: str,
        disposition: str,
        agent_id: str,
        agent_name: str,
    ) -> None:
        self._add(
            _ENDED,
            tenant,
            handoff_id,
            session_id,
            trigger,
            reason,
            queue,
            _at(requested_ms),
            _at(ended_ms),
            outcome,
            disposition,
            agent_id,
            agent_name,
        )

    def observe_turn(self, turn: Turn, duration: float) -> None:
        """The engine's `on_turn_end`: one turn fact (replays are not new turns)."""
        result = turn.result
        if result.outcome == "replayed" or not turn.turn_id or turn.timings is None:
            return
        timings = turn.timings
        usage = result.usage
        self.turn(
            tenant=turn.tenant,
            session_id=turn.session_id,
            turn_id=turn.turn_id,
            intent=turn.intent,
            outcome=result.outcome,
            reason=result.reason,
            ttft_ms=None
            if timings.first_token is None
            else (timings.first_token - timings.started) * 1000,
            duration_ms=duration * 1000,
            input_tokens=usage.input_tokens if usage is not None else 0,
            output_tokens=usage.output_tokens if usage is not None else 0,
            sentiment=turn.sentiment.score if turn.sentiment is not None else None,
            escalated=turn.escalation is not None,
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
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            for row in batch:
                await conn.execute(row.sql, *row.args, timeout=self._timeout)
        for _ in batch:
            self._pending.popleft()
        self.written += len(batch)
        log.debug(
            "event=recorder_flushed rows=%d ms=%.1f",
            len(batch),
            (time.monotonic() - started) * 1000,
        )

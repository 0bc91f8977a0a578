"""The outbox writer: Redis outbox entries applied to PostgreSQL.

(A little over 400 lines: the entry format, its folding into rows and the
writer that drains it belong together; the format changes with the writer.)

The session scripts append an entry to the session's outbox stream
(`kr:{t:s}:outbox`) in the same atomic step that changes the session, and
mark the session in the pending index (`kr:{outbox}:pending`, a sorted set
whose score grows with every write). This writer drains them:

    one sweep = the pending sessions (up to a batch) → their entries (one
    pipelined XRANGE) → one PostgreSQL transaction of idempotent upserts →
    XDEL of the applied entries → the session unmarked if nothing was added
    meanwhile (its score is unchanged; checked atomically)

so a crash anywhere in a sweep repeats the upserts, never loses or doubles a
row. While PostgreSQL is down the entries stay in Redis and the backlog
grows (`korero_postgres_outbox_backlog`); sweeps retry with backoff and the
chat goes on. With nothing to write for `probe_interval` seconds the writer
pings PostgreSQL instead, so its state (`on_state`: the health service
`korero.history`) follows PostgreSQL with no traffic too — an outage while
idle, or a server started while PostgreSQL is down. `commit()` runs a sweep
of one session at once: the runner calls it before a turn's `done`, so a turn
acknowledged while PostgreSQL answers is already in PostgreSQL.

Every instance runs a writer; two writers draining the same session write the
same rows (the upserts make that harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from korero.server.errors import HistoryUnavailableError, KoreroError
from korero.server.storage.boundary import redis_boundary
from korero.server.storage.history import HistoryStore, OutboxBatch
from korero.server.storage.keys import (
    OUTBOX_PENDING,
    parse_pending_member,
    pending_member,
    session_key,
)
from korero.server.storage.records import tool_calls_of

__all__ = ["OutboxWriter", "add_entry"]

log = logging.getLogger(__name__)

_SESSIONS_PER_SWEEP = 200
_ENTRIES_PER_SESSION = 500
_MAX_BACKOFF = 5.0
_DOWN_FOR = 1.0
"""After a failed write, `commit()` does not wait for PostgreSQL for this long."""

# Unmark a session only if nothing was written to its outbox since it was read.
_UNMARK = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


def _turn_no(turn_id: str) -> int:
    return int(turn_id[1:]) if turn_id[1:].isdigit() else 0


def _clean(value: Any) -> Any:
    """Text PostgreSQL accepts: NUL (refused in `text` and `jsonb`) becomes U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def add_entry(batch: OutboxBatch, tenant: str, session_id: str, entry_id: str, raw: bytes) -> None:
    """Fold one outbox entry into the batch of rows to upsert (an entry that cannot be
    read is logged and skipped: one bad entry must not hold back every session)."""
    try:
        _add_entry(batch, tenant, session_id, entry_id, raw)
    except (ValueError, KeyError, TypeError) as exc:
        log.error("event=outbox_entry_unreadable entry=%s error=%s", entry_id, type(exc).__name__)


def _add_entry(batch: OutboxBatch, tenant: str, session_id: str, entry_id: str, raw: bytes) -> None:
    d: dict[str, Any] = _clean(json.loads(raw))
    if isinstance(d.get("metadata"), str):  # JSON inside JSON: clean the decoded form
        d["metadata"] = json.dumps(_clean(json.loads(d["metadata"])))
    ts = float(d.get("ts") or time.time() * 1000)
    epoch = int(d.get("ep") or 0)
    row = batch.session(tenant, session_id, ts, epoch)
    kind = d.get("k")
    created = _ms_to_dt(ts)
    if kind == "s":
        if entry_id > row["meta_version"]:
            row["metadata"], row["meta_version"] = d.get("metadata") or "{}", entry_id
    elif kind == "u":
        turn = int(d.get("turn") or _turn_no(d["turn_id"]))
        row["turn_count"] = max(row["turn_count"], turn)
        row["seq_high"] = max(row["seq_high"], int(d.get("seq") or 0))
        batch.users.append(
            (
                epoch,
                (
                    tenant,
                    session_id,
                    turn,
                    d["turn_id"],
                    d.get("cmid", ""),
                    d.get("text", ""),
                    d.get("intent") or "",
                    created,
                ),
            )
        )
    elif kind == "h":  # a customer's or agent's message while a person owns the session
        seq = int(d["seq"])
        row["seq_high"] = max(row["seq_high"], seq)
        sentiment = d.get("sentiment")
        batch.handoff_messages.append(
            (
                epoch,
                (
                    tenant,
                    session_id,
                    seq,
                    d["hid"],
                    "agent" if d.get("role") == "agent" else "customer",
                    d.get("author", ""),
                    d.get("cmid", ""),
                    d.get("text", ""),
                    float(sentiment) if isinstance(sentiment, int | float) else None,
                    created,
                ),
            )
        )
    elif kind == "q":  # a turn's seq reservation moved up: a rehydration numbers above it
        row["seq_high"] = max(row["seq_high"], int(d.get("seq") or 0))
    elif kind == "a":
        row["seq_high"] = max(row["seq_high"], int(d.get("seq") or 0))
        if d.get("summary"):
            row["summary"] = d["summary"]
        if d.get("status") == "done" and d.get("answer"):
            usage = d.get("usage")
            citations = d.get("citations")
            batch.answers.append(
                (
                    epoch,
                    (
                        tenant,
                        session_id,
                        _turn_no(d["turn_id"]),
                        d["turn_id"],
                        d.get("cmid", ""),
                        d["answer"],
                        d.get("model", ""),
                        d.get("finish_reason", ""),
                        json.dumps(usage if isinstance(usage, dict) else {}),
                        json.dumps(citations if isinstance(citations, list) else []),
                        json.dumps(d.get("timings") if isinstance(d.get("timings"), dict) else {}),
                        bool(d.get("cached")),
                        created,
                        json.dumps(list(tool_calls_of(d.get("tool_calls")))),
                    ),
                )
            )


def _ms_to_dt(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class OutboxWriter:
    """Drains every session's outbox into PostgreSQL, in the background and on demand."""

    def __init__(
        self,
        redis: aioredis.Redis,
        history: HistoryStore,
        *,
        drain_interval: float,
        commit_wait: float,
        on_backlog: Callable[[int], None] = lambda _n: None,
        on_error: Callable[[str], None] = lambda _op: None,
        on_commit_wait: Callable[[float], None] = lambda _s: None,
        on_state: Callable[[bool], None] = lambda _up: None,
        probe_interval: float = 2.0,
    ) -> None:
        self._redis = redis
        self._history = history
        self._interval = drain_interval
        self._commit_wait = commit_wait
        self._on_backlog = on_backlog
        self._on_error = on_error
        self._on_commit_wait = on_commit_wait
        self._on_state = on_state
        self._up = True
        self._unmark: AsyncScript = redis.register_script(_UNMARK)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed_at = 0.0
        self._probe_interval = probe_interval
        self._heard_at = -float("inf")  # the last write or ping that reached PostgreSQL (or not)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.backlog = 0
        """Outbox entries seen but not yet written at the end of the last sweep."""
        self.written = 0
        """Entries this writer applied to PostgreSQL (for tests and logs)."""

    @property
    def postgres_up(self) -> bool:
        """False for a moment after a failed write: `commit()` then does not wait."""
        return time.monotonic() - self._failed_at > _DOWN_FOR

    def _state(self, *, up: bool) -> None:
        if up != self._up:
            self._up = up
            state = "writable" if up else "unwritable"
            log.warning("event=postgres_%s backlog=%d", state, self.backlog)
            self._on_state(up)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-writer")

    async def stop(self) -> None:
        """Stop sweeping; one last sweep first, so a clean shutdown leaves nothing behind."""
        if self._task is None:
            return
        self._task.cancel()
        # Bounded: a sweep stuck past its own timeouts is left behind, not waited for.
        await asyncio.wait({self._task}, timeout=5.0)
        self._task = None
        with contextlib.suppress(KoreroError, asyncio.TimeoutError):
            async with asyncio.timeout(2.0):
                await self.sweep()

    def notify(self) -> None:
        """Something was written: sweep soon."""
        self._wake.set()

    async def commit(self, tenant: str, session_id: str) -> bool:
        """Write this session's outbox to PostgreSQL now; True once it is there.

        Waits at most `commit_wait` (not at all while PostgreSQL is known to be
        down); the entries stay in the outbox either way, so a False only
        means "not yet". A Redis failure (the outbox cannot be read) raises:
        then nothing may be acknowledged.
        """
        if not self.postgres_up:
            return False
        started = time.monotonic()
        task = asyncio.ensure_future(self._drain_sessions([(tenant, session_id, None)]))
        done, _ = await asyncio.wait({task}, timeout=self._commit_wait)
        self._on_commit_wait(time.monotonic() - started)
        if not done:
            task.add_done_callback(_quiet)
            return False
        try:
            task.result()
        except HistoryUnavailableError:
            return False
        return True

    async def sweep(self) -> int:
        """One pass over the pending sessions; returns how many entries were written."""
        async with redis_boundary():
            marked = await self._redis.zrange(
                OUTBOX_PENDING, 0, _SESSIONS_PER_SWEEP - 1, withscores=True
            )
        sessions: list[tuple[str, str, float | None]] = []
        for member, score in cast(list[tuple[bytes, float]], marked):
            tenant, session_id = parse_pending_member(member)
            sessions.append((tenant, session_id, float(score)))
        if not sessions:
            self.backlog = 0
            self._on_backlog(0)
            return 0
        return await self._drain_sessions(sessions)

    async def _drain_sessions(self, sessions: Sequence[tuple[str, str, float | None]]) -> int:
        locks = [self._locks.setdefault((t, s), asyncio.Lock()) for t, s, _ in sessions]
        for lock in locks:  # same order everywhere: no deadlock between sweeps and commits
            await lock.acquire()
        try:
            return await self._drain_locked(sessions)
        finally:
            for lock, (t, s, _) in zip(locks, sessions, strict=True):
                lock.release()
                if not lock.locked() and not lock._waiters:
                    self._locks.pop((t, s), None)

    async def _drain_locked(self, sessions: Sequence[tuple[str, str, float | None]]) -> int:
        keys = [session_key(t, s, "outbox") for t, s, _ in sessions]
        async with redis_boundary(), self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xrange(key, count=_ENTRIES_PER_SESSION)
            for key in keys:
                pipe.xlen(key)
            replies = await pipe.execute()
        ranges, lengths = replies[: len(keys)], replies[len(keys) :]
        batch = OutboxBatch()
        for (tenant, session_id, _), entries in zip(sessions, ranges, strict=True):
            for entry_id, fields in entries:
                add_entry(batch, tenant, session_id, entry_id.decode(), fields[b"d"])
        total = sum(len(e) for e in ranges)
        if total:
            try:
                await self._history.apply(batch)
            except KoreroError:
                self._failed_at = self._heard_at = time.monotonic()
                self._on_error("write")
                self._state(up=False)
                self.backlog = sum(int(n) for n in lengths)
                self._on_backlog(self.backlog)
                raise
        self.written += total
        if total:
            self._heard_at = time.monotonic()
            self._state(up=True)
        try:
            await self._forget(sessions, keys, ranges)
        except KoreroError as error:  # written already: the next sweep rewrites, harmlessly
            log.warning("event=outbox_cleanup_failed reason=%s", error.reason)
        remaining = sum(int(n) for n in lengths) - total
        if sessions and sessions[0][2] is not None:  # a sweep: report what is left
            self.backlog = max(0, remaining)
            self._on_backlog(self.backlog)
        return total

    async def _forget(
        self,
        sessions: Sequence[tuple[str, str, float | None]],
        keys: Sequence[str],
        ranges: Sequence[Any],
    ) -> None:
        """Delete written entries; unmark sessions that got nothing new meanwhile."""
        async with redis_boundary(), self._redis.pipeline(transaction=False) as pipe:
            for key, entries in zip(keys, ranges, strict=True):
                if entries:
                    pipe.xdel(key, *[entry_id for entry_id, _ in entries])
            for (tenant, session_id, score), entries in zip(sessions, ranges, strict=True):
                if score is not None and len(entries) < _ENTRIES_PER_SESSION:
                    await self._unmark(  # queued; the pipeline loads it if Redis lacks it
                        keys=[OUTBOX_PENDING],
                        args=[pending_member(tenant, session_id), _score(score)],
                        client=pipe,
                    )
            await pipe.execute(raise_on_error=False)

    async def _run(self) -> None:
        backoff = self._interval
        while True:
            try:
                written = await self.sweep()
            except KoreroError as error:
                log.warning("event=outbox_sweep_failed reason=%s", error.reason)
                backoff = min(_MAX_BACKOFF, max(backoff * 2, self._interval))
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                continue
            except Exception:
                log.exception("event=outbox_sweep_crashed")
                await asyncio.sleep(_MAX_BACKOFF)
                continue
            backoff = self._interval
            if written:
                continue  # more may be waiting: sweep again at once
            await self._probe_when_idle()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()

    async def _probe_when_idle(self) -> None:
        """Ping PostgreSQL when no write has reached (or failed to reach) it for
        `probe_interval`: the only way an idle writer sees it go or come back."""
        if time.monotonic() - self._heard_at < self._probe_interval:
            return
        try:
            await self._history.ping()
        except KoreroError as error:
            self._failed_at = self._heard_at = time.monotonic()
            log.debug("event=postgres_ping_failed reason=%s", error.reason)
            self._state(up=False)
            return
        self._heard_at = time.monotonic()
        self._state(up=True)


def _score(score: float) -> str:
    """A ZSCORE reply as Redis prints it (integral scores have no decimal point)."""
    return str(int(score)) if float(score).is_integer() else repr(score)


def _quiet(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()

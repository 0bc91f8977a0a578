"""Session state in Redis.

(Longer than 400 lines: the layout below, and one method per Lua script with
the decoding of its reply — begin, renew, finish, abort, resume — kept next to
each other so the outcome rules of a turn read in one place; the scripts
themselves are in session_scripts.py.)

Layout, for tenant `t` and session `s` (the hash tag keeps one session's keys
in one Redis Cluster slot, and the tenant prefix keeps tenants apart):

    kr:{t:s}:meta     hash   created_at, updated_at (ms), metadata (JSON),
                             seq (last sequence number issued), turns (count),
                             inflight / inflight_until / inflight_cmid (the turn
                             lease: holder, expiry, its message),
                             owner (the handoff owning the session, see handoff/),
                             summary (JSON: older turns, see context/assembly.py)
    kr:{t:s}:history  list   JSON messages (user ones with the router's intent),
                             oldest first, trimmed to a bound
    kr:{t:s}:turns    hash   client_message_id -> JSON turn record (idempotency)

A turn costs two round trips: `begin_turn` (one Lua script: idempotency check,
turn lease, user message persisted, history and metadata read back, a block of
sequence numbers reserved) and `finish_turn` (one Lua script: answer and turn
record persisted, lease released, unused sequence numbers handed back). Another
store's script (the response cache's lookup and store) can ride in the same
pipeline as either (`ScriptCall`), so it adds no round trip.

Turn ownership is a lease (`KORERO_TURN_LEASE` seconds) that the running turn
renews (`renew_turn`); a begin that finds the lease expired declares the
holder's turn failed (`TURN_ORPHANED`), so a crashed instance locks its
sessions for seconds, not minutes. Writes whose outcome a timeout left unknown
converge when sent again: a begin carries an attempt id (sent twice, it
answers the same; `abort_begin` gives it up, even if it lands later), and a
finish applies once and never overwrites a settled record (`FinishOutcome`).

Keys come from `keys.py`, records from `records.py`, the Lua from
`session_scripts.py`; every call runs inside the one Redis error boundary.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from korero.server.errors import (
    InvalidArgumentError,
    KoreroError,
    NotFoundError,
    StoreUnavailableError,
)
from korero.server.settings import EngineSettings, RedisSettings
from korero.server.storage import session_scripts as lua
from korero.server.storage.boundary import redis_boundary
from korero.server.storage.connection import connect
from korero.server.storage.history import HistorySession
from korero.server.storage.keys import (
    OUTBOX_PENDING,
    pending_member,
    rate_limit_key,
    session_key,
)
from korero.server.storage.records import (
    FinishOutcome,
    SessionRecord,
    StoredMessage,
    TurnBegin,
    TurnRecord,
    TurnState,
)
from korero.server.storage.scripts import ScriptCall, run_scripts

__all__ = ["SEQ_RESERVE", "SessionStore"]

_SESSION_PARTS = ("meta", "history", "turns", "outbox", "events", "relay")  # relay: handoff/

SEQ_RESERVE = 256
"""Sequence numbers a turn in flight may hand out ahead of its last logged event.

A turn numbers its events in memory (no round trip per event); the log appends
keep this reservation ahead of it, and its finish hands the unused part back.
Only a turn that dies mid-answer leaves a gap, of at most this many numbers.
"""


class SessionStore:
    """Sessions, history and turn records of one tenant-partitioned keyspace."""

    def __init__(
        self, client: aioredis.Redis, engine: EngineSettings, *, outbox: bool = False
    ) -> None:
        self._redis = client
        self._settings = engine
        self._outbox = outbox
        self._ttl_ms = engine.session_ttl * 1000
        self._lease_ms = int(engine.turn_lease * 1000)
        self._create: AsyncScript = client.register_script(lua.CREATE)
        self._resume: AsyncScript = client.register_script(lua.RESUME)
        self._begin: AsyncScript = client.register_script(lua.BEGIN_TURN)
        self._renew: AsyncScript = client.register_script(lua.RENEW_TURN)
        self._abort: AsyncScript = client.register_script(lua.ABORT_BEGIN)
        self._finish: AsyncScript = client.register_script(lua.FINISH_TURN)
        self._rehydrate: AsyncScript = client.register_script(lua.REHYDRATE)
        self._mark: AsyncScript = client.register_script(lua.MARK_PENDING)
        self._append: AsyncScript = client.register_script(lua.APPEND_EVENTS)
        self._follow: AsyncScript = client.register_script(lua.FOLLOW_LOG)
        self._reserve: AsyncScript = client.register_script(lua.RESERVE_SEQS)
        self._state: AsyncScript = client.register_script(lua.TURN_STATE)

    @classmethod
    def connect(
        cls, redis_settings: RedisSettings, engine: EngineSettings, *, outbox: bool = False
    ) -> SessionStore:
        """A store on one Redis or a Redis Cluster, as the URL says (`connection.py`).

        Either way callers wait for a connection (up to the Redis timeout)
        instead of failing with MaxConnectionsError under bursts.
        """
        return cls(connect(redis_settings), engine, outbox=outbox)

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def close(self) -> None:
        await self._redis.aclose()

    @property
    def outbox(self) -> bool:
        """True when writes also go to the outbox (PostgreSQL is configured)."""
        return self._outbox

    def _keys(self, tenant: str, session_id: str) -> list[str]:
        return [
            session_key(tenant, session_id, "meta"),
            session_key(tenant, session_id, "history"),
            session_key(tenant, session_id, "turns"),
        ]

    def _outbox_keys(self, tenant: str, session_id: str) -> list[str]:
        """The outbox key (last key of a script) when the outbox is on, else nothing."""
        return [session_key(tenant, session_id, "outbox")] if self._outbox else []

    def _marks(self, tenant: str, session_id: str) -> list[ScriptCall]:
        """Mark the session as having outbox entries (rides in the same pipeline)."""
        if not self._outbox:
            return []
        return [ScriptCall(self._mark, (OUTBOX_PENDING,), (pending_member(tenant, session_id),))]

    async def ping(self) -> bool:
        async with redis_boundary():
            return bool(await self._redis.ping())

    async def create_session(self, tenant: str, metadata: Mapping[str, Any]) -> SessionRecord:
        """A new session with a fresh id; its `last_seq` is the started event's seq."""
        session_id = uuid.uuid4().hex
        keys = self._keys(tenant, session_id)
        call = ScriptCall(
            self._create,
            (keys[0], *self._outbox_keys(tenant, session_id)),
            (_dumps(metadata), self._ttl_ms),
        )
        async with redis_boundary():
            out, *_ = await run_scripts(self._redis, [call, *self._marks(tenant, session_id)])
        if out[0] != b"created":  # a uuid4 collision: astronomically unlikely
            raise KoreroError(grpc.StatusCode.ABORTED, "SESSION_ID_COLLISION", "try again")
        return SessionRecord.from_hash(tenant, session_id, _pairs(out[1]), 0)

    async def resume_session(
        self,
        tenant: str,
        session_id: str,
        metadata: Mapping[str, Any] | None,
        after_seq: int | None = None,
    ) -> SessionRecord:
        """Reopen a session, merging metadata; with a cursor, read the logged events after it.

        The events come back as `SessionRecord.missed` (`(seq, bytes)`, in order).
        """
        meta, history = self._keys(tenant, session_id)[:2]
        call = ScriptCall(
            self._resume,
            (
                meta,
                history,
                session_key(tenant, session_id, "events"),
                *self._outbox_keys(tenant, session_id),
            ),
            (
                _dumps(metadata) if metadata else "",
                self._ttl_ms,
                "" if after_seq is None else after_seq,
            ),
        )
        marks = self._marks(tenant, session_id) if metadata else []
        async with redis_boundary():
            out, *_ = await run_scripts(self._redis, [call, *marks])
        if out[0] == b"missing":
            raise InvalidArgumentError(
                "SESSION_NOT_FOUND", f"no session {session_id!r} to resume; start a new one"
            )
        record = SessionRecord.from_hash(tenant, session_id, _pairs(out[1]), int(out[2]))
        return dataclasses.replace(record, missed=_logged(out[3]))

    async def get_session(self, tenant: str, session_id: str) -> SessionRecord:
        meta, history, _ = self._keys(tenant, session_id)
        async with redis_boundary(), self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(meta)
            pipe.llen(history)
            raw, count = await pipe.execute()
        if not raw:
            raise NotFoundError("SESSION_NOT_FOUND", f"no session {session_id!r}")
        return SessionRecord.from_hash(tenant, session_id, raw, int(count))

    async def list_messages(
        self, tenant: str, session_id: str, page_size: int, page_token: str
    ) -> tuple[list[StoredMessage], str]:
        """A page of history, oldest first, and the token of the next page."""
        start = _decode_page_token(page_token, self._settings.history_max_messages)
        meta, history, _ = self._keys(tenant, session_id)
        async with redis_boundary(), self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(meta)
            pipe.lrange(history, start, start + page_size)  # one extra: is there more?
            exists, raw = await pipe.execute()
        if not exists:
            raise NotFoundError("SESSION_NOT_FOUND", f"no session {session_id!r}")
        messages = [StoredMessage.from_json(r) for r in raw[:page_size]]
        more = len(raw) > page_size
        return messages, _encode_page_token(start + page_size) if more else ""

    async def history_window(
        self, tenant: str, session_id: str
    ) -> tuple[bool, list[StoredMessage]]:
        """Whether the session exists in Redis, and its whole (bounded) history list."""
        meta, history, _ = self._keys(tenant, session_id)
        async with redis_boundary(), self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(meta)
            pipe.lrange(history, 0, -1)
            exists, raw = await pipe.execute()
        return bool(exists), [StoredMessage.from_json(r) for r in raw]

    async def begin_turn(
        self,
        tenant: str,
        session_id: str,
        client_message_id: str,
        text: str,
        replay_events: int,
        *,
        attempt: str,
        intent: str = "",
        signals: Mapping[str, float] | None = None,
        also: Sequence[ScriptCall] = (),
    ) -> TurnBegin:
        """Record the user message and take the session's turn lease, in one round trip.

        `attempt` names this begin: sent again it gives the same answer, and
        `abort_begin` with it gives it up. `intent` and `signals` (sentiment,
        router confidence) are stored with the user message. A session a
        human agent owns is not touched: the status is `human` and `turn_id`
        names the owning handoff. `also` (calls on other key spaces: the KB
        version, the response cache) travel in the same pipeline and their
        replies come back, in order, as `TurnBegin.replies`.
        """
        s = self._settings
        call = ScriptCall(
            self._begin,
            (*self._keys(tenant, session_id), *self._outbox_keys(tenant, session_id)),
            (
                client_message_id,
                text,
                s.history_max_messages,
                s.prompt_history_messages,  # counting the new message, read back and dropped
                self._ttl_ms,
                self._lease_ms,
                SEQ_RESERVE,
                replay_events,
                intent,
                attempt,
                _dumps(signals) if signals else "",
            ),
        )
        marks = self._marks(tenant, session_id)
        async with redis_boundary():
            out, *replies = await run_scripts(self._redis, [call, *also, *marks])
        if marks:
            replies = replies[: len(replies) - len(marks)]
        status = out[0].decode()
        if status == "missing":
            raise InvalidArgumentError("SESSION_NOT_FOUND", f"session {session_id!r} has expired")
        if status == "replay":
            record = TurnRecord.from_json(out[1])
            return TurnBegin("replay", record.turn_id, int(out[2]), record, replies=tuple(replies))
        if status == "running":
            record = TurnRecord.from_json(out[1])
            return TurnBegin(
                "running", record.turn_id, int(out[2]), record=record, replies=tuple(replies)
            )
        if status in ("busy", "human"):
            return TurnBegin(status, out[1].decode(), replies=tuple(replies))
        if status == "aborted":
            raise StoreUnavailableError("this attempt to begin the turn was given up; try again")
        session = SessionRecord.from_hash(tenant, session_id, _pairs(out[3]), int(out[5]))
        # The prompt takes the message from the engine, not Redis (a retry of a
        # failed turn finds its message earlier in the history).
        history = tuple(
            m
            for m in map(StoredMessage.from_json, out[4])
            if not (m.role == "user" and m.client_message_id == client_message_id)
        )
        return TurnBegin(
            "started",
            out[1].decode(),
            int(out[2]),
            session=session,
            history=history,
            replies=tuple(replies),
        )

    async def finish_turn(
        self,
        tenant: str,
        session_id: str,
        client_message_id: str,
        record: TurnRecord,
        last_seq: int,
        *,
        events: Sequence[tuple[int, bytes]] = (),
        summary: str = "",
        also: Sequence[ScriptCall] = (),
        cached: bool = False,
        timings: Mapping[str, float] | None = None,
        tool_calls: Sequence[Mapping[str, Any]] = (),
    ) -> FinishOutcome:
        """Persist the outcome, release the lease and hand back unused seqs, in one round trip.

        Applied once: sent again (its outcome unknown after a timeout), or for a
        turn already settled (declared failed when its lease ran out), it changes
        nothing and says what is stored; `lost` also when the session vanished
        from Redis under the turn. `summary` (JSON) replaces the session's
        summary of older turns; `also` (e.g. storing the answer in the response
        cache) rides in the same pipeline. `cached` and `timings` go to
        PostgreSQL with the answer. `events` (the turn's events not yet logged,
        its terminal one last) go into the event log in the same step.
        `tool_calls` (name, status, duration, source; never arguments) are kept
        with the answer, in Redis and PostgreSQL.
        """
        assistant = ""
        calls = [dict(c) for c in tool_calls]
        if record.status == "done" and record.answer:
            assistant = json.dumps(
                {
                    "role": "assistant",
                    "text": record.answer,
                    "turn_id": record.turn_id,
                    "cmid": "",
                    **({"tools": calls} if calls else {}),
                }
            )
        call = ScriptCall(
            self._finish,
            tuple(self._keys(tenant, session_id)),
            (
                client_message_id,
                record.turn_id,
                record.status,
                record.to_json(),
                assistant,
                self._settings.event_log_max_events,
                last_seq,
                self._settings.history_max_messages,
                self._ttl_ms,
                summary,
                _dumps(
                    {
                        "k": "a",
                        "turn_id": record.turn_id,
                        "cmid": client_message_id,
                        "status": record.status,
                        "answer": record.answer,
                        "finish_reason": record.finish_reason,
                        "model": record.model,
                        "usage": record.usage,
                        "citations": list(record.citations),
                        "seq": last_seq,
                        "summary": summary,
                        "cached": cached,
                        "timings": dict(timings or {}),
                        **({"tool_calls": calls} if calls else {}),
                    }
                ),
                self._settings.event_log_max_age * 1000,
                *_flat(events),
            ),
        )
        call = dataclasses.replace(
            call,
            keys=(
                *call.keys,
                session_key(tenant, session_id, "events"),
                *self._outbox_keys(tenant, session_id),
            ),
        )
        async with redis_boundary():
            out, *_ = await run_scripts(
                self._redis, [call, *also, *self._marks(tenant, session_id)]
            )
        status = out[0].decode()
        stored = TurnRecord.from_json(out[1]) if status == "settled" else None
        return FinishOutcome(status, stored)

    async def renew_turn(self, tenant: str, session_id: str, turn_id: str) -> bool:
        """Extend the lease of a running turn; False when it is no longer the holder."""
        async with redis_boundary():
            held = await self._renew(
                keys=[session_key(tenant, session_id, "meta")], args=[turn_id, self._lease_ms]
            )
        return bool(held)

    async def abort_begin(
        self, tenant: str, session_id: str, client_message_id: str, attempt: str
    ) -> str:
        """Give up a begin whose outcome is unknown: if it ran, its turn failed and
        its lease is released; if it has not, it will refuse to run. Idempotent.

        Returns what was found: `aborted`, `tombstone`, `settled`, `other` or `missing`.
        """
        meta, _, turns = self._keys(tenant, session_id)
        async with redis_boundary():
            out = await self._abort(
                keys=[meta, turns], args=[client_message_id, attempt, self._ttl_ms]
            )
        return str(out.decode() if isinstance(out, bytes) else out)

    async def run(self, call: ScriptCall) -> None:
        """Run one script call (errors translated like every store call)."""
        async with redis_boundary():
            await run_scripts(self._redis, [call])

    async def turn_state(self, tenant: str, session_id: str, client_message_id: str) -> TurnState:
        """The stored record of a message's turn and who holds the session's lease."""
        meta, _, turns = self._keys(tenant, session_id)
        async with redis_boundary():
            raw, holder, live = await self._state(keys=[meta, turns], args=[client_message_id])
        return TurnState(
            TurnRecord.from_json(raw) if raw else None, holder.decode(), bool(int(live))
        )

    async def rehydrate(
        self,
        tenant: str,
        session_id: str,
        stored: HistorySession,
        messages: Sequence[StoredMessage],
        records: Mapping[str, TurnRecord],
        seq: int,
        epoch: int,
    ) -> bool:
        """Recreate a session missing from Redis from PostgreSQL's copy, whole or not at all.

        False when the session exists in Redis again (another stream brought it back first).
        """
        entries = [
            json.dumps(
                {
                    "role": m.role,
                    "text": m.text,
                    "turn_id": m.turn_id,
                    "cmid": m.client_message_id,
                    "ts": int(m.created_at * 1000),
                    **({"intent": m.intent} if m.intent else {}),
                    **({"tools": list(m.tool_calls)} if m.tool_calls else {}),
                },
                ensure_ascii=False,
            )
            for m in messages[-self._settings.history_max_messages :]
        ]
        call = ScriptCall(
            self._rehydrate,
            tuple(self._keys(tenant, session_id)),
            (
                int(stored.created_at * 1000),
                int(stored.updated_at * 1000),
                _dumps(stored.metadata),
                seq,
                stored.turn_count,
                json.dumps(stored.summary, ensure_ascii=False) if stored.summary else "",
                self._ttl_ms,
                json.dumps(entries, ensure_ascii=False),
                json.dumps({cmid: r.to_json() for cmid, r in records.items()}, ensure_ascii=False)
                if records
                else "{}",
                epoch,
            ),
        )
        async with redis_boundary():
            out, *_ = await run_scripts(self._redis, [call])
        return bool(out)

    async def delete_session(self, tenant: str, session_id: str) -> bool:
        """Remove every Redis key of the session (and its outbox mark); False if none existed."""
        keys = [session_key(tenant, session_id, part) for part in _SESSION_PARTS]
        keys.append(rate_limit_key(tenant, f"session:{session_id}"))
        async with redis_boundary(), self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(*keys[:-1])
            pipe.delete(keys[-1])
            pipe.zrem(OUTBOX_PENDING, pending_member(tenant, session_id))
            removed, _, _ = await pipe.execute()
        return bool(removed)

    async def reserve_seqs(self, tenant: str, session_id: str, count: int) -> int:
        """Reserve `count` seqs above all handed out; returns the base (first is base + 1).

        Raises SESSION_NOT_FOUND when the session is gone (nothing is written).
        """
        call = ScriptCall(self._reserve, (session_key(tenant, session_id, "meta"),), (count,))
        async with redis_boundary():
            (base,) = await run_scripts(self._redis, [call])
        if int(base) < 0:
            raise InvalidArgumentError("SESSION_NOT_FOUND", f"session {session_id!r} has expired")
        return int(base)

    async def append_events(
        self, tenant: str, session_id: str, turn_id: str, events: Sequence[tuple[int, bytes]]
    ) -> int:
        """Add events to the session's log (idempotent by seq); the last seq logged, -1 if gone.

        `turn_id` (the turn holding the session, or "") keeps its seq reservation ahead.
        """
        s = self._settings
        call = ScriptCall(
            self._append,
            (
                session_key(tenant, session_id, "meta"),
                session_key(tenant, session_id, "events"),
                *self._outbox_keys(tenant, session_id),
            ),
            (
                turn_id,
                SEQ_RESERVE,
                s.event_log_max_events,
                s.event_log_max_age * 1000,
                self._ttl_ms,
                *_flat(events),
            ),
        )
        marks = self._marks(tenant, session_id) if turn_id else []
        async with redis_boundary():
            out, *_ = await run_scripts(self._redis, [call, *marks])
        return int(out)

    async def follow_log(
        self, tenant: str, session_id: str, after_seq: int, watch_ms: int, count: int = 500
    ) -> tuple[bool, str, list[tuple[int, bytes]]]:
        """Logged events after `after_seq`, the turn holding the session ("" if none), and
        whether the session exists; `watch_ms` > 0 tells a detached owner someone watches."""
        call = ScriptCall(
            self._follow,
            (session_key(tenant, session_id, "meta"), session_key(tenant, session_id, "events")),
            (after_seq, watch_ms, count),
        )
        async with redis_boundary():
            (out,) = await run_scripts(self._redis, [call])
        if out[0] == b"missing":
            return False, "", []
        return True, out[1].decode(), list(_logged(out[2]))

    async def watched_until(self, tenant: str, session_id: str) -> float:
        """Until when (unix seconds) a follower on another instance watches the running turn."""
        async with redis_boundary():
            raw = await self._redis.hget(session_key(tenant, session_id, "meta"), "watch_until")
        return int(raw) / 1000 if raw else 0.0


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False)


def _flat(events: Sequence[tuple[int, bytes]]) -> list[int | bytes]:
    return [x for seq, raw in events for x in (seq, raw)]


def _logged(entries: list[Any]) -> tuple[tuple[int, bytes], ...]:
    """XRANGE replies of the event log as (seq, event bytes)."""
    out = []
    for entry_id, fields in entries:
        pairs = _pairs(fields)
        out.append((int(entry_id.split(b"-", 1)[0]), pairs[b"e"]))
    return tuple(out)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _decode_page_token(token: str, most: int) -> int:
    """The offset a page token carries; tokens this server issues never pass `most`
    (the history bound), and Redis refuses offsets past 64 bits."""
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        offset = int(value)
    except (ValueError, UnicodeDecodeError):
        offset = -1
        kind = ""
    if kind != "o" or not 0 <= offset <= most:
        raise InvalidArgumentError("INVALID_PAGE_TOKEN", "page_token was not issued by this server")
    return offset

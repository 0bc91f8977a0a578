"""Session state in Redis.

Layout, for tenant `t` and session `s` (the hash tag keeps one session's keys
in one Redis Cluster slot, and the tenant prefix keeps tenants apart):

    kr:{t:s}:meta     hash   created_at, updated_at (ms), metadata (JSON),
                             seq (last sequence number issued), turns (count),
                             inflight / inflight_until / inflight_cmid (the turn
                             lease: holder, expiry, its message),
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
from korero.server.storage.keys import session_key
from korero.server.storage.records import (
    FinishOutcome,
    SessionRecord,
    StoredMessage,
    TurnBegin,
    TurnRecord,
    TurnState,
)
from korero.server.storage.scripts import ScriptCall, run_scripts

__all__ = ["SEQ_BLOCK", "SessionStore"]

SEQ_BLOCK = 1_000_000_000
"""Sequence numbers reserved by a turn; unused ones are handed back at its end.

Reserving a block lets a turn number its events in memory (no round trip per
event) while any other stream on the same session still gets higher numbers.
"""


class SessionStore:
    """Sessions, history and turn records of one tenant-partitioned keyspace."""

    def __init__(self, client: aioredis.Redis, engine: EngineSettings) -> None:
        self._redis = client
        self._settings = engine
        self._ttl_ms = engine.session_ttl * 1000
        self._lease_ms = int(engine.turn_lease * 1000)
        self._create: AsyncScript = client.register_script(lua.CREATE)
        self._resume: AsyncScript = client.register_script(lua.RESUME)
        self._begin: AsyncScript = client.register_script(lua.BEGIN_TURN)
        self._renew: AsyncScript = client.register_script(lua.RENEW_TURN)
        self._abort: AsyncScript = client.register_script(lua.ABORT_BEGIN)
        self._finish: AsyncScript = client.register_script(lua.FINISH_TURN)
        self._state: AsyncScript = client.register_script(lua.TURN_STATE)

    @classmethod
    def connect(cls, redis_settings: RedisSettings, engine: EngineSettings) -> SessionStore:
        """A store over a blocking connection pool sized by settings.

        A blocking pool makes callers wait for a connection (up to the Redis
        timeout) instead of failing with MaxConnectionsError under bursts.
        """
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_settings.url,
            max_connections=redis_settings.max_connections,
            timeout=redis_settings.timeout,
            socket_timeout=redis_settings.timeout,
            socket_connect_timeout=redis_settings.timeout,
        )
        return cls(aioredis.Redis(connection_pool=pool), engine)

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def close(self) -> None:
        await self._redis.aclose()

    def _keys(self, tenant: str, session_id: str) -> list[str]:
        return [
            session_key(tenant, session_id, "meta"),
            session_key(tenant, session_id, "history"),
            session_key(tenant, session_id, "turns"),
        ]

    async def ping(self) -> bool:
        async with redis_boundary():
            return bool(await self._redis.ping())

    async def create_session(self, tenant: str, metadata: Mapping[str, Any]) -> SessionRecord:
        """A new session with a fresh id; its `last_seq` is the started event's seq."""
        session_id = uuid.uuid4().hex
        keys = self._keys(tenant, session_id)
        async with redis_boundary():
            out = await self._create(keys=keys[:1], args=[_dumps(metadata), self._ttl_ms])
        if out[0] != b"created":  # a uuid4 collision: astronomically unlikely
            raise KoreroError(grpc.StatusCode.ABORTED, "SESSION_ID_COLLISION", "try again")
        return SessionRecord.from_hash(tenant, session_id, _pairs(out[1]), 0)

    async def resume_session(
        self, tenant: str, session_id: str, metadata: Mapping[str, Any] | None
    ) -> SessionRecord:
        """Reopen a session, merging metadata; its `last_seq` is the resumed event's seq."""
        async with redis_boundary():
            out = await self._resume(
                keys=self._keys(tenant, session_id)[:2],
                args=[_dumps(metadata) if metadata else "", self._ttl_ms],
            )
        if out[0] == b"missing":
            raise InvalidArgumentError(
                "SESSION_NOT_FOUND", f"no session {session_id!r} to resume; start a new one"
            )
        return SessionRecord.from_hash(tenant, session_id, _pairs(out[1]), int(out[2]))

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
        also: Sequence[ScriptCall] = (),
    ) -> TurnBegin:
        """Record the user message and take the session's turn lease, in one round trip.

        `attempt` names this begin: sent again it gives the same answer, and
        `abort_begin` with it gives it up. `intent` is stored with the user
        message; `also` (calls on other key spaces: the KB version, the
        response cache) travel in the same pipeline and their replies come
        back, in order, as `TurnBegin.replies`.
        """
        s = self._settings
        call = ScriptCall(
            self._begin,
            tuple(self._keys(tenant, session_id)),
            (
                client_message_id,
                text,
                s.history_max_messages,
                s.prompt_history_messages,  # counting the new message, read back and dropped
                self._ttl_ms,
                self._lease_ms,
                SEQ_BLOCK,
                replay_events,
                intent,
                attempt,
            ),
        )
        async with redis_boundary():
            out, *replies = await run_scripts(self._redis, [call, *also])
        status = out[0].decode()
        if status == "missing":
            raise InvalidArgumentError("SESSION_NOT_FOUND", f"session {session_id!r} has expired")
        if status == "replay":
            record = TurnRecord.from_json(out[1])
            return TurnBegin("replay", record.turn_id, int(out[2]), record, replies=tuple(replies))
        if status == "running":
            record = TurnRecord.from_json(out[1])
            return TurnBegin("running", record.turn_id, record=record, replies=tuple(replies))
        if status == "busy":
            return TurnBegin("busy", out[1].decode(), replies=tuple(replies))
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
        seq_base: int,
        last_seq: int,
        *,
        summary: str = "",
        also: Sequence[ScriptCall] = (),
    ) -> FinishOutcome:
        """Persist the outcome, release the lease and hand back unused seqs, in one round trip.

        Applied once: sent again (its outcome unknown after a timeout), or for a
        turn already settled (declared failed when its lease ran out), it changes
        nothing and says what is stored. `summary` (JSON) replaces the session's
        summary of older turns; `also` (e.g. storing the answer in the response
        cache) rides in the same pipeline.
        """
        assistant = ""
        if record.status == "done" and record.answer:
            assistant = json.dumps(
                {"role": "assistant", "text": record.answer, "turn_id": record.turn_id, "cmid": ""}
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
                seq_base + SEQ_BLOCK,
                last_seq,
                self._settings.history_max_messages,
                self._ttl_ms,
                summary,
            ),
        )
        async with redis_boundary():
            out, *_ = await run_scripts(self._redis, [call, *also])
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

    async def reserve_seqs(self, tenant: str, session_id: str, count: int) -> int:
        """Reserve `count` sequence numbers; returns the base (first is base + 1)."""
        async with redis_boundary():
            top = await self._redis.hincrby(session_key(tenant, session_id, "meta"), "seq", count)
        return int(top) - count


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False)


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

"""Session state in Redis.

Layout, for tenant `t` and session `s` (the hash tag keeps one session's keys
in one Redis Cluster slot, and the tenant prefix keeps tenants apart):

    kr:{t:s}:meta     hash   created_at, updated_at (ms), metadata (JSON),
                             seq (last sequence number issued), turns (count),
                             inflight / inflight_until (the turn lock),
                             summary (JSON: older turns, see context.py)
    kr:{t:s}:history  list   JSON messages (user ones with the router's intent),
                             oldest first, trimmed to a bound
    kr:{t:s}:turns    hash   client_message_id -> JSON turn record (idempotency)

A turn costs two round trips: `begin_turn` (one Lua script: idempotency check,
turn lock, user message persisted, history and metadata read back, a block of
sequence numbers reserved) and `finish_turn` (one Lua script: answer and turn
record persisted, lock released, unused sequence numbers handed back). Another
store's script (the response cache's lookup and store) can ride in the same
pipeline as either (`ScriptCall`), so it adds no round trip.

Redis exceptions are translated to `StoreUnavailableError` / `KoreroError`
here and nowhere else.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.commands.core import AsyncScript

from korero.server.errors import (
    InvalidArgumentError,
    KoreroError,
    NotFoundError,
    StoreUnavailableError,
)
from korero.server.settings import EngineSettings, RedisSettings
from korero.server.storage.scripts import ScriptCall, run_scripts

__all__ = [
    "SEQ_BLOCK",
    "SessionRecord",
    "SessionStore",
    "StoredMessage",
    "TurnBegin",
    "TurnRecord",
    "redis_boundary",
    "session_key",
    "translate_redis_error",
]

SEQ_BLOCK = 1_000_000_000
"""Sequence numbers reserved by a turn; unused ones are handed back at its end.

Reserving a block lets a turn number its events in memory (no round trip per
event) while any other stream on the same session still gets higher numbers.
"""

_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    rexc.ConnectionError,  # includes AuthenticationError, MaxConnectionsError
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.ReadOnlyError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.MasterDownError,
    rexc.ClusterError,
    OSError,
    TimeoutError,
)


def translate_redis_error(exc: BaseException) -> KoreroError:
    """Map a Redis (or socket) failure to the error clients see."""
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return StoreUnavailableError(f"session store unavailable ({type(exc).__name__})")
    return KoreroError(
        grpc.StatusCode.INTERNAL,
        "STORE_ERROR",
        f"session store error ({type(exc).__name__})",
    )


@asynccontextmanager
async def redis_boundary() -> AsyncIterator[None]:
    """Translate Redis failures inside the block (for stores other than `SessionStore`)."""
    try:
        yield
    except KoreroError:
        raise
    except (rexc.RedisError, OSError, TimeoutError) as exc:
        raise translate_redis_error(exc) from exc


def session_key(tenant: str, session_id: str, part: str) -> str:
    """The Redis key of one part of a session."""
    return f"kr:{{{tenant}:{session_id}}}:{part}"


@dataclass(frozen=True)
class StoredMessage:
    """One message of a session's history."""

    role: Literal["user", "assistant"]
    text: str
    turn_id: str
    client_message_id: str
    created_at: float  # unix seconds
    intent: str = ""
    """The router's decision for a user message (empty for answers)."""

    @property
    def turn_number(self) -> int:
        """n of turn id `t<n>` (0 if the id has another form)."""
        return int(self.turn_id[1:]) if self.turn_id[1:].isdigit() else 0

    @classmethod
    def from_json(cls, raw: bytes | str) -> StoredMessage:
        d = json.loads(raw)
        return cls(
            d["role"],
            d["text"],
            d["turn_id"],
            d.get("cmid", ""),
            d["ts"] / 1000,
            d.get("intent", ""),
        )


@dataclass(frozen=True)
class SessionRecord:
    """A session's stored metadata and counters."""

    tenant: str
    session_id: str
    metadata: dict[str, Any]
    created_at: float
    updated_at: float
    last_seq: int
    turn_count: int
    message_count: int
    summary: dict[str, Any] = field(default_factory=dict)
    """Summary of older turns kept by context assembly: `{"through": n, "text": ...}`."""

    @classmethod
    def from_hash(
        cls, tenant: str, session_id: str, raw: Mapping[bytes, bytes], message_count: int
    ) -> SessionRecord:
        h = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            tenant=tenant,
            session_id=session_id,
            metadata=json.loads(h.get("metadata", "{}")),
            created_at=int(h.get("created_at", "0")) / 1000,
            updated_at=int(h.get("updated_at", "0")) / 1000,
            last_seq=int(h.get("seq", "0")),
            turn_count=int(h.get("turns", "0")),
            message_count=message_count,
            summary=json.loads(h["summary"]) if h.get("summary") else {},
        )


@dataclass(frozen=True)
class TurnRecord:
    """What the store remembers of a turn, keyed by client_message_id."""

    turn_id: str
    status: Literal["running", "done", "failed", "cancelled"]
    answer: str = ""
    finish_reason: str = ""
    model: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    citations: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "turn_id": self.turn_id,
                "status": self.status,
                "answer": self.answer,
                "finish_reason": self.finish_reason,
                "model": self.model,
                "usage": self.usage,
                "citations": list(self.citations),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> TurnRecord:
        d = json.loads(raw)
        usage = d.get("usage") or {}
        return cls(
            turn_id=d["turn_id"],
            status=d["status"],
            answer=d.get("answer", ""),
            finish_reason=d.get("finish_reason", ""),
            model=d.get("model", ""),
            usage=usage if isinstance(usage, dict) else {},
            citations=tuple(c for c in d.get("citations") or () if isinstance(c, dict)),
        )


@dataclass(frozen=True)
class TurnBegin:
    """Outcome of `SessionStore.begin_turn`.

    - `started`: a new turn holds the lock; number events from `seq_base + 1`.
    - `replay`: the message was answered before; `record` holds the answer and
      `seq_base + 1 .. seq_base + replay_events` are reserved for the replay.
    - `running`: the message's turn is in flight (maybe on another instance).
    - `busy`: another turn of this session is in flight.
    """

    status: Literal["started", "replay", "running", "busy"]
    turn_id: str = ""
    seq_base: int = 0
    record: TurnRecord | None = None
    session: SessionRecord | None = None
    history: tuple[StoredMessage, ...] = ()
    probe: Any = None
    """The reply of the `ScriptCall` sent along with `begin_turn`, if any."""


_CREATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('HSET', KEYS[1], 'created_at', now, 'updated_at', now,
           'metadata', ARGV[1], 'seq', 1, 'turns', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {'created', redis.call('HGETALL', KEYS[1])}
"""

_RESUME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
redis.call('HINCRBY', KEYS[1], 'seq', 1)
if ARGV[1] ~= '' then
  local current = cjson.decode(redis.call('HGET', KEYS[1], 'metadata') or '{}')
  local update = cjson.decode(ARGV[1])
  for k, v in pairs(update) do
    if k == 'attributes' and type(current[k]) == 'table' then
      for ak, av in pairs(v) do current[k][ak] = av end
    else
      current[k] = v
    end
  end
  redis.call('HSET', KEYS[1], 'metadata', cjson.encode(current))
end
redis.call('HSET', KEYS[1], 'updated_at', now)
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[2]) end
return {'resumed', redis.call('HGETALL', KEYS[1]), redis.call('LLEN', KEYS[2])}
"""

_BEGIN_TURN = """
local meta, hist, turns = KEYS[1], KEYS[2], KEYS[3]
local cmid, text = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', meta) == 0 then return {'missing'} end
local holder = redis.call('HGET', meta, 'inflight')
local locked = holder and tonumber(redis.call('HGET', meta, 'inflight_until') or '0') > now
local rec = redis.call('HGET', turns, cmid)
if rec then
  local r = cjson.decode(rec)
  if r.status == 'done' then
    return {'replay', rec, redis.call('HINCRBY', meta, 'seq', ARGV[8]) - ARGV[8]}
  end
  if r.status == 'running' and locked and holder == r.turn_id then
    return {'running', rec}
  end
end
if locked then return {'busy', holder} end
local n = redis.call('HINCRBY', meta, 'turns', 1)
local turn_id = 't' .. n
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
redis.call('HSET', meta, 'seq', seq + tonumber(ARGV[7]), 'inflight', turn_id,
           'inflight_until', now + tonumber(ARGV[6]), 'updated_at', now)
redis.call('HSET', turns, cmid, cjson.encode({turn_id = turn_id, status = 'running'}))
local last = redis.call('LINDEX', hist, -1)
if not (rec and last and cjson.decode(last).cmid == cmid) then
  local msg = {role = 'user', text = text, turn_id = turn_id, cmid = cmid, ts = now}
  if ARGV[9] and ARGV[9] ~= '' then msg.intent = ARGV[9] end
  redis.call('RPUSH', hist, cjson.encode(msg))
  redis.call('LTRIM', hist, -tonumber(ARGV[3]), -1)
end
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[5]) end
return {'started', turn_id, seq, redis.call('HGETALL', meta),
        redis.call('LRANGE', hist, -tonumber(ARGV[4]), -1), redis.call('LLEN', hist)}
"""

_FINISH_TURN = """
local meta, hist, turns = KEYS[1], KEYS[2], KEYS[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[5] ~= '' then
  local msg = cjson.decode(ARGV[5])
  msg.ts = now
  redis.call('RPUSH', hist, cjson.encode(msg))
  redis.call('LTRIM', hist, -tonumber(ARGV[8]), -1)
end
redis.call('HSET', turns, ARGV[1], ARGV[4])
if ARGV[10] and ARGV[10] ~= '' then redis.call('HSET', meta, 'summary', ARGV[10]) end
if redis.call('HGET', meta, 'inflight') == ARGV[2] then
  redis.call('HDEL', meta, 'inflight', 'inflight_until')
end
if tonumber(redis.call('HGET', meta, 'seq') or '0') == tonumber(ARGV[6]) then
  redis.call('HSET', meta, 'seq', ARGV[7])
end
redis.call('HSET', meta, 'updated_at', now)
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[9]) end
return 1
"""


class SessionStore:
    """Sessions, history and turn records of one tenant-partitioned keyspace."""

    def __init__(self, client: aioredis.Redis, engine: EngineSettings) -> None:
        self._redis = client
        self._settings = engine
        self._ttl_ms = engine.session_ttl * 1000
        self._lock_ms = int((engine.turn_timeout + 30) * 1000)
        self._create: AsyncScript = client.register_script(_CREATE)
        self._resume: AsyncScript = client.register_script(_RESUME)
        self._begin: AsyncScript = client.register_script(_BEGIN_TURN)
        self._finish: AsyncScript = client.register_script(_FINISH_TURN)

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

    @asynccontextmanager
    async def _boundary(self) -> AsyncIterator[None]:
        try:
            yield
        except KoreroError:
            raise
        except (rexc.RedisError, OSError, TimeoutError) as exc:
            raise translate_redis_error(exc) from exc

    def _keys(self, tenant: str, session_id: str) -> list[str]:
        return [
            session_key(tenant, session_id, "meta"),
            session_key(tenant, session_id, "history"),
            session_key(tenant, session_id, "turns"),
        ]

    async def ping(self) -> bool:
        async with self._boundary():
            return bool(await self._redis.ping())

    async def create_session(self, tenant: str, metadata: Mapping[str, Any]) -> SessionRecord:
        """A new session with a fresh id; its `last_seq` is the started event's seq."""
        session_id = uuid.uuid4().hex
        keys = self._keys(tenant, session_id)
        async with self._boundary():
            out = await self._create(keys=keys[:1], args=[_dumps(metadata), self._ttl_ms])
        if out[0] != b"created":  # a uuid4 collision: astronomically unlikely
            raise KoreroError(grpc.StatusCode.ABORTED, "SESSION_ID_COLLISION", "try again")
        return SessionRecord.from_hash(tenant, session_id, _pairs(out[1]), 0)

    async def resume_session(
        self, tenant: str, session_id: str, metadata: Mapping[str, Any] | None
    ) -> SessionRecord:
        """Reopen a session, merging metadata; its `last_seq` is the resumed event's seq."""
        async with self._boundary():
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
        async with self._boundary(), self._redis.pipeline(transaction=False) as pipe:
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
        start = _decode_page_token(page_token)
        meta, history, _ = self._keys(tenant, session_id)
        async with self._boundary(), self._redis.pipeline(transaction=False) as pipe:
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
        intent: str = "",
        probe: ScriptCall | None = None,
    ) -> TurnBegin:
        """Record the user message and lock the session for a turn, in one round trip.

        `intent` is stored with the user message; `probe` (a call on another
        key space, e.g. the response cache) travels in the same pipeline and
        its reply comes back as `TurnBegin.probe`.
        """
        s = self._settings
        call = ScriptCall(
            self._begin,
            tuple(self._keys(tenant, session_id)),
            (
                client_message_id,
                text,
                s.history_max_messages,
                s.prompt_history_messages,
                self._ttl_ms,
                self._lock_ms,
                SEQ_BLOCK,
                replay_events,
                intent,
            ),
        )
        async with self._boundary():
            out, *rest = await run_scripts(self._redis, [call] if probe is None else [call, probe])
            probed = rest[0] if rest else None
        status = out[0].decode()
        if status == "missing":
            raise InvalidArgumentError("SESSION_NOT_FOUND", f"session {session_id!r} has expired")
        if status == "replay":
            record = TurnRecord.from_json(out[1])
            return TurnBegin("replay", record.turn_id, int(out[2]), record, probe=probed)
        if status == "running":
            record = TurnRecord.from_json(out[1])
            return TurnBegin("running", record.turn_id, record=record, probe=probed)
        if status == "busy":
            return TurnBegin("busy", out[1].decode(), probe=probed)
        session = SessionRecord.from_hash(tenant, session_id, _pairs(out[3]), int(out[5]))
        history = tuple(StoredMessage.from_json(m) for m in out[4])
        return TurnBegin(
            "started",
            out[1].decode(),
            int(out[2]),
            session=session,
            history=history,
            probe=probed,
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
    ) -> None:
        """Persist the outcome, release the lock and hand back unused seqs, in one round trip.

        `summary` (JSON) replaces the session's summary of older turns; `also`
        (e.g. storing the answer in the response cache) rides in the same pipeline.
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
        async with self._boundary():
            await run_scripts(self._redis, [call, *also])

    async def run(self, call: ScriptCall) -> None:
        """Run one script call (errors translated like every store call)."""
        async with self._boundary():
            await run_scripts(self._redis, [call])

    async def turn_record(
        self, tenant: str, session_id: str, client_message_id: str
    ) -> TurnRecord | None:
        """The stored record of a message's turn, if any."""
        async with self._boundary():
            raw = await self._redis.hget(
                session_key(tenant, session_id, "turns"), client_message_id
            )
        return TurnRecord.from_json(raw) if raw else None

    async def reserve_seqs(self, tenant: str, session_id: str, count: int) -> int:
        """Reserve `count` sequence numbers; returns the base (first is base + 1)."""
        async with self._boundary():
            top = await self._redis.hincrby(session_key(tenant, session_id, "meta"), "seq", count)
        return int(top) - count


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        offset = int(value)
    except (ValueError, UnicodeDecodeError):
        offset = -1
        kind = ""
    if kind != "o" or offset < 0:
        raise InvalidArgumentError("INVALID_PAGE_TOKEN", "page_token was not issued by this server")
    return offset

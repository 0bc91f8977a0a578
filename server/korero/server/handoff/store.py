"""The agent desk and the session relay in Redis.

(Over 400 lines: one thin method per desk script, each the only caller of its
script; splitting them by caller would put one Lua contract in two places.)

Layout (see storage/keys.py): per tenant, under the `{t:desk}` hash tag,

    handoffs   hash  handoff id -> JSON record (open handoffs only)
    sessions   hash  session id -> open handoff id
    agents     hash  agent id -> JSON (name, skills, capacity, status,
                     active and offered handoffs, last assignment, last seen)
    stats      hash  ewma_wait_ms, accepted
    queues     set   queue names with waiting handoffs
    queue:<q>  zset  waiting handoff ids by request time (a handoff that goes
                     back to the queue keeps its place at the front)
    wh:<target>…     the webhook outbox (webhooks.py)

and per session, under the session's own tag, `relay` (a stream of handoff
events and relayed messages, each with the session seq it was given) next
to the session's `owner` field. Every call runs inside the Redis boundary.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from korero.server.errors import StoreUnavailableError
from korero.server.handoff import scripts as lua
from korero.server.handoff.records import AgentRecord, DeskSnapshot, HandoffRecord, RelayEntry
from korero.server.storage import session_scripts as session_lua
from korero.server.storage.boundary import redis_boundary
from korero.server.storage.keys import (
    OUTBOX_PENDING,
    desk_key,
    pending_member,
    session_channel,
    session_key,
)
from korero.server.storage.records import StoredMessage, TurnRecord
from korero.server.storage.scripts import ScriptCall, run_scripts

__all__ = ["AppendResult", "HandoffStore", "RelayItem", "SessionContext"]

AppendMode = Literal["open", "keep", "close", "any"]
_BUSY_ATTEMPTS = 600  # waiting ~5 minutes at most for a bot turn to end (its own timeout bounds it)


@dataclass(frozen=True)
class RelayItem:
    """One thing to append to a session's relay log."""

    kind: str
    event: bytes = b""
    """For the customer's stream: a serialized Event without seq."""
    body: dict[str, Any] | None = None
    """For the agent's desk."""
    history: dict[str, Any] | None = None
    """A message to store in the session's history (role, text, ...)."""
    record: dict[str, Any] | None = None
    """A `handoff_messages` row for PostgreSQL (role, author, cmid, text, sentiment),
    appended to the session's outbox; the script adds its seq, handoff and time."""


@dataclass(frozen=True)
class AppendResult:
    status: Literal["ok", "missing", "owned", "not_owner", "duplicate"]
    seqs: tuple[int, ...] = ()
    owner: str = ""


@dataclass(frozen=True)
class SessionContext:
    """A session as an agent needs it, read in one consistent step."""

    metadata: dict[str, Any]
    summary: dict[str, Any]
    history: tuple[StoredMessage, ...]
    turns: tuple[TurnRecord, ...]
    relay_tail: str
    """The relay log's last entry id when this was read ('0' if empty)."""
    last_seq: int


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class HandoffStore:
    """Desk scripts and relay log access over one Redis client."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_seconds: int,
        relay_max: int,
        outbox: bool = False,
        on_outbox: Callable[[], None] = lambda: None,
    ) -> None:
        self._redis = client
        self._ttl_ms = ttl_seconds * 1000
        self._relay_max = relay_max
        self._outbox = outbox
        self._on_outbox = on_outbox
        self._append: AsyncScript = client.register_script(lua.RELAY_APPEND)
        self._mark: AsyncScript = client.register_script(session_lua.MARK_PENDING)
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(getattr(lua, name))
            for name in (
                "DESK_REQUEST",
                "DESK_TICK",
                "DESK_ACCEPT",
                "DESK_DECLINE",
                "DESK_PICK",
                "DESK_RELEASE",
                "DESK_AGENT_JOIN",
                "DESK_AGENT_UPDATE",
                "DESK_AGENT_LEAVE",
            )
        }

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    # The session side ------------------------------------------------------------

    async def append(
        self,
        tenant: str,
        session_id: str,
        mode: AppendMode,
        handoff_id: str,
        items: Sequence[RelayItem],
        *,
        client_message_id: str = "",
    ) -> AppendResult:
        """Append `items` to the session's relay log (numbered with the session seq).

        `open` claims the session for the handoff (refused if another owns
        it), `keep` requires the handoff to own it, `close` also releases it,
        `any` checks nothing. A `client_message_id` already relayed returns
        `duplicate` with its seq. With the outbox on, each item's `record` goes to
        the session's outbox in the same step, and the session is marked pending
        in the same round trip (the pending index is in another slot).
        """
        args: list[Any] = [
            mode,
            handoff_id,
            self._ttl_ms,
            self._relay_max,
            session_channel(tenant, session_id),
            client_message_id,
            len(items),
        ]
        for item in items:
            args += [
                item.kind,
                item.event,
                json.dumps(item.body, ensure_ascii=False) if item.body else "",
                json.dumps(item.history, ensure_ascii=False) if item.history else "",
                json.dumps(item.record, ensure_ascii=False) if item.record else "",
            ]
        parts = ("meta", "history", "relay", "turns", "events")
        durable = self._outbox and any(item.record for item in items)
        keys = [session_key(tenant, session_id, p) for p in parts]
        marks: list[ScriptCall] = []
        if durable:
            keys.append(session_key(tenant, session_id, "outbox"))
            marks.append(
                ScriptCall(self._mark, (OUTBOX_PENDING,), (pending_member(tenant, session_id),))
            )
        for attempt in range(_BUSY_ATTEMPTS):
            async with redis_boundary():
                out, *_ = await run_scripts(
                    self._redis, [ScriptCall(self._append, tuple(keys), tuple(args)), *marks]
                )
            if _text(out[0]) != "busy":
                break
            # A bot turn still holds the session (its answer is streaming): wait for it.
            # An `open` has claimed the session already; the items follow as `keep`.
            args[0] = "keep" if mode == "open" else mode
            await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
        else:
            raise StoreUnavailableError("a turn is still holding the session; try again")
        status = _text(out[0])
        if status == "ok":
            if durable:
                self._on_outbox()
            return AppendResult("ok", tuple(int(s) for s in out[1:]))
        if status == "duplicate":
            return AppendResult("duplicate", (int(out[1]),))
        owner = _text(out[1]) if len(out) > 1 else ""
        return AppendResult(status, owner=owner)  # type: ignore[arg-type]

    async def read_relay(
        self, tenant: str, session_id: str, after: str, count: int = 500
    ) -> list[RelayEntry]:
        """Relay log entries after entry id `after` ('0': from the start), oldest first."""
        async with redis_boundary():
            raw = await self._redis.xrange(
                session_key(tenant, session_id, "relay"),
                f"({after}" if after != "0" else "-",
                "+",
                count=count,
            )
        return [RelayEntry.from_fields(entry_id, fields) for entry_id, fields in raw or ()]  # type: ignore[arg-type]

    async def owner(self, tenant: str, session_id: str) -> str:
        async with redis_boundary():
            raw = await self._redis.hget(session_key(tenant, session_id, "meta"), "owner")
        return _text(raw) if raw else ""

    async def session_context(self, tenant: str, session_id: str) -> SessionContext | None:
        """Metadata, history, turn records and the relay tail, as of one moment."""
        meta, history, turns, relay = (
            session_key(tenant, session_id, p) for p in ("meta", "history", "turns", "relay")
        )
        async with redis_boundary(), self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta)
            pipe.lrange(history, 0, -1)
            pipe.hvals(turns)
            pipe.xrevrange(relay, "+", "-", count=1)
            raw_meta, raw_history, raw_turns, tail = await pipe.execute()
        if not raw_meta:
            return None
        h = {_text(k): _text(v) for k, v in raw_meta.items()}
        records = []
        for raw in raw_turns:
            data = json.loads(raw)
            if data.get("status") in ("done", "failed", "cancelled", "running"):
                records.append(TurnRecord.from_json(raw))
        return SessionContext(
            metadata=json.loads(h.get("metadata", "{}")),
            summary=json.loads(h["summary"]) if h.get("summary") else {},
            history=tuple(StoredMessage.from_json(m) for m in raw_history),
            turns=tuple(records),
            relay_tail=_text(tail[0][0]) if tail else "0",
            last_seq=int(h.get("seq", "0")),
        )

    # The desk side ------------------------------------------------------------

    def _desk_keys(self, tenant: str) -> list[str]:
        return [desk_key(tenant, p) for p in ("handoffs", "sessions", "agents", "stats", "queues")]

    async def _desk(
        self,
        name: str,
        tenant: str,
        now_ms: int,
        *args: Any,
        outbox: Sequence[tuple[str, str]] = (),
    ) -> list[Any]:
        flat: list[Any] = [desk_key(tenant, ""), now_ms, *args]
        if outbox or name in ("DESK_REQUEST", "DESK_ACCEPT", "DESK_PICK", "DESK_RELEASE"):
            flat.append(len(outbox))
            for target, payload in outbox:
                flat += [target, payload]
        async with redis_boundary():
            out: list[Any] = await self._scripts[name](keys=self._desk_keys(tenant), args=flat)
        return out

    async def request(
        self,
        tenant: str,
        now_ms: int,
        handoff_id: str,
        session_id: str,
        record: dict[str, Any],
        outbox: Sequence[tuple[str, str]],
        *,
        picked_by: tuple[str, str] | None = None,
    ) -> tuple[str, HandoffRecord | None, str]:
        """Queue a handoff: (`queued`, record, '') or (`exists`, None, open handoff id).

        With `picked_by` (agent id, display name) that agent takes the session over at
        once instead: (`ok`, record, ''), (`exists`, None, open handoff id), or
        (another status of DESK_PICK, None, '').
        """
        head = (tenant, now_ms, handoff_id, session_id, json.dumps(record))
        if picked_by is None:
            out = await self._desk("DESK_REQUEST", *head, outbox=outbox)
        else:
            out = await self._desk("DESK_PICK", *head, *picked_by, outbox=outbox)
        status = _text(out[0])
        if status == "exists":
            return status, None, _text(out[1])
        if picked_by is None:
            return "queued", HandoffRecord.from_json(out[1]), ""
        if status == "ok":
            return status, HandoffRecord.from_json(out[1]), ""
        return status, None, ""

    async def tick(
        self, tenant: str, now_ms: int, *, offer_ms: int, stale_ms: int, grace_ms: int
    ) -> tuple[list[HandoffRecord], list[HandoffRecord], list[tuple[str, str]]]:
        """Expire offers and graces, then offer waiting handoffs to agents.

        Returns (handoffs whose agent went silent, now in grace; handoffs put back
        in the queue after a grace; [(handoff, agent) offers made]).
        """
        out = await self._desk("DESK_TICK", tenant, now_ms, offer_ms, stale_ms, grace_ms)
        items = [_text(x) for x in out]
        first = items.index("|")
        second = items.index("|", first + 1)
        graced = [HandoffRecord.from_json(x) for x in items[:first]]
        requeued = [HandoffRecord.from_json(x) for x in items[first + 1 : second]]
        offers = items[second + 1 :]
        return graced, requeued, list(zip(offers[::2], offers[1::2], strict=True))

    async def accept(
        self,
        tenant: str,
        now_ms: int,
        handoff_id: str,
        agent_id: str,
        agent_name: str,
        *,
        pick: bool,
        default_wait_ms: int,
        outbox: Sequence[tuple[str, str]],
    ) -> tuple[str, HandoffRecord | None, bool]:
        """(status, record, first join). Status: ok, already, taken, not_offered, missing."""
        out = await self._desk(
            "DESK_ACCEPT",
            tenant,
            now_ms,
            handoff_id,
            agent_id,
            agent_name,
            "pick" if pick else "offer",
            default_wait_ms,
            outbox=outbox,
        )
        status = _text(out[0])
        record = HandoffRecord.from_json(out[1]) if status in ("ok", "already") else None
        first = status == "ok" and _text(out[2]) == "1"
        return status, record, first

    async def decline(self, tenant: str, now_ms: int, handoff_id: str, agent_id: str) -> bool:
        out = await self._desk("DESK_DECLINE", tenant, now_ms, handoff_id, agent_id)
        return _text(out[0]) == "ok"

    async def release(
        self,
        tenant: str,
        now_ms: int,
        handoff_id: str,
        agent_id: str,
        outcome: str,
        disposition: str,
        outbox: Sequence[tuple[str, str]],
    ) -> tuple[str, HandoffRecord | None]:
        out = await self._desk(
            "DESK_RELEASE",
            tenant,
            now_ms,
            handoff_id,
            agent_id,
            outcome,
            disposition,
            outbox=outbox,
        )
        status = _text(out[0])
        return status, HandoffRecord.from_json(out[1]) if status == "ok" else None

    async def agent_join(
        self, tenant: str, now_ms: int, agent_id: str, spec: dict[str, Any], connection: str
    ) -> list[tuple[str, str]]:
        """Sign an agent in: [(handoff id, state before)] of the agent's conversations."""
        out = await self._desk(
            "DESK_AGENT_JOIN", tenant, now_ms, agent_id, json.dumps(spec), connection
        )
        items = [_text(x) for x in out]
        return list(zip(items[::2], items[1::2], strict=True))

    async def agent_update(
        self,
        tenant: str,
        now_ms: int,
        agent_id: str,
        connection: str,
        *,
        status: str = "",
        skills: dict[str, int] | None = None,
    ) -> list[HandoffRecord] | None:
        """None for a stale connection, else the handoffs taken back from a grace period."""
        out = await self._desk(
            "DESK_AGENT_UPDATE",
            tenant,
            now_ms,
            agent_id,
            connection,
            status,
            json.dumps(skills) if skills is not None else "",
        )
        if not out:
            return None
        return [HandoffRecord.from_json(x) for x in out[1:]]

    async def agent_leave(
        self, tenant: str, now_ms: int, agent_id: str, connection: str, grace_ms: int
    ) -> list[HandoffRecord]:
        out = await self._desk("DESK_AGENT_LEAVE", tenant, now_ms, agent_id, connection, grace_ms)
        return [HandoffRecord.from_json(x) for x in out]

    async def snapshot(self, tenant: str) -> DeskSnapshot:
        async with redis_boundary(), self._redis.pipeline(transaction=False) as pipe:
            pipe.hvals(desk_key(tenant, "handoffs"))
            pipe.hvals(desk_key(tenant, "agents"))
            pipe.hget(desk_key(tenant, "stats"), "ewma_wait_ms")
            handoffs, agents, ewma = await pipe.execute()
        return DeskSnapshot(
            tuple(HandoffRecord.from_json(h) for h in handoffs),
            tuple(AgentRecord.from_json(a) for a in agents),
            int(ewma) if ewma is not None else None,
        )

    async def open_handoff(self, tenant: str, session_id: str) -> HandoffRecord | None:
        async with redis_boundary():
            hid = await self._redis.hget(desk_key(tenant, "sessions"), session_id)
            if not hid:
                return None
            raw = await self._redis.hget(desk_key(tenant, "handoffs"), hid)
        return HandoffRecord.from_json(raw) if raw else None

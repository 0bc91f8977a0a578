"""What the session store keeps: sessions, messages and turn records.

Plain frozen values, each with its own (de)serialization; the store and the
engine exchange these, never raw Redis replies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "FinishOutcome",
    "SessionRecord",
    "StoredMessage",
    "TurnBegin",
    "TurnRecord",
    "TurnState",
    "tool_calls_of",
]


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
    sentiment: float | None = None
    """The user message's sentiment score (-1..1), when scored."""
    trend: float | None = None
    """The sentiment trend when the user message arrived, when scored."""
    confidence: float | None = None
    """The router's confidence for a user message, when routed."""
    agent: str = ""
    """The human agent's display name: an answer written by an agent, not the model."""
    tool_calls: tuple[dict[str, Any], ...] = ()
    """An answer's tool calls: `{"name", "status", "duration_ms", "source", "cached"}` each."""

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
            _number(d.get("sentiment")),
            _number(d.get("trend")),
            _number(d.get("confidence")),
            d.get("agent", ""),
            tool_calls_of(d.get("tools")),
        )


def tool_calls_of(value: Any) -> tuple[dict[str, Any], ...]:
    """The tool call records in a stored list (anything else: none)."""
    if not isinstance(value, list):
        return ()
    return tuple(c for c in value if isinstance(c, dict) and isinstance(c.get("name"), str))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


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
    seq_top: int = 0
    """The highest seq a turn in flight may have handed out (its reservation)."""
    inflight: str = ""
    """The turn holding the session, if any."""
    inflight_cmid: str = ""
    """The client_message_id of that turn."""
    turn_base: int = 0
    """The last seq before the turn in flight began (its events are above it)."""
    log_floor: int = 0
    """The highest seq trimmed from the event log (a cursor below it cannot be replayed whole)."""
    rehydrated: bool = False
    """The session was brought back from PostgreSQL."""
    missed: tuple[tuple[int, bytes], ...] = ()
    """On a resume with a cursor: the logged events after it, (seq, event bytes) in order."""

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
            seq_top=int(h.get("seq_top", "0")),
            inflight=h.get("inflight", ""),
            inflight_cmid=h.get("inflight_cmid", ""),
            turn_base=int(h.get("turn_base", "0")),
            log_floor=int(h.get("log_floor", "0")),
            rehydrated=h.get("rehydrated") == "1",
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
    - `running`: the message's turn is in flight (maybe on another instance),
      holding a live lease.
    - `busy`: another turn of this session is in flight.
    - `human`: a human agent owns the session (`turn_id` is the handoff id);
      nothing was stored and the bot must not answer.
    """

    status: Literal["started", "replay", "running", "busy", "human"]
    turn_id: str = ""
    seq_base: int = 0
    record: TurnRecord | None = None
    session: SessionRecord | None = None
    history: tuple[StoredMessage, ...] = ()
    replies: tuple[Any, ...] = ()
    """The replies of the `ScriptCall`s sent along with `begin_turn`, in order."""


@dataclass(frozen=True)
class FinishOutcome:
    """Outcome of `SessionStore.finish_turn`.

    - `applied`: this call stored the outcome.
    - `settled`: the turn's record was settled already (`stored`): an earlier
      send of the same finish, or the turn was declared failed when its lease
      ran out. Nothing was changed.
    - `lost`: the message's record belongs to a later turn (this one was
      declared failed and the message ran again). Nothing was changed.
    """

    status: Literal["applied", "settled", "lost"]
    stored: TurnRecord | None = None


@dataclass(frozen=True)
class TurnState:
    """A message's turn record and the session's lease, read together."""

    record: TurnRecord | None
    holder: str
    """The turn holding the session's lease ("" if none)."""
    live: bool
    """Whether that lease has not run out."""

    def running_elsewhere(self, turn_id: str) -> bool:
        """Whether turn `turn_id` still runs under a live lease."""
        record = self.record
        return (
            record is not None
            and record.turn_id == turn_id
            and record.status == "running"
            and self.holder == turn_id
            and self.live
        )

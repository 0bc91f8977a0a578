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
    - `running`: the message's turn is in flight (maybe on another instance),
      holding a live lease.
    - `busy`: another turn of this session is in flight.
    """

    status: Literal["started", "replay", "running", "busy"]
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

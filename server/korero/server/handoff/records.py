"""What the agent desk keeps: handoff records, agents, relay log entries.

Plain values with their (de)serialization; the desk scripts (scripts.py)
read and write the same JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["AgentRecord", "DeskSnapshot", "HandoffRecord", "HandoffState", "RelayEntry"]

HandoffState = Literal["queued", "offered", "active", "grace", "ended"]


def _ids(value: Any) -> tuple[str, ...]:
    """A JSON id set (`{"id": 1}`; cjson writes an empty one as `{}` or `[]`)."""
    return tuple(sorted(value)) if isinstance(value, dict) else ()


@dataclass(frozen=True)
class HandoffRecord:
    """One handoff: a session handed to (or waiting for) a human agent."""

    id: str
    session: str
    state: HandoffState
    trigger: str
    """A trigger name of `settings.HandoffTriggerName`."""
    reason: str
    queue: str
    requested: int
    """Unix ms."""
    customer: str = ""
    offered_to: str = ""
    offer_until: int = 0
    agent: str = ""
    agent_name: str = ""
    joined: int = 0
    grace_until: int = 0
    ended: int = 0
    outcome: str = ""
    disposition: str = ""
    turn_id: str = ""
    """The turn that escalated, if a turn did."""

    @classmethod
    def from_json(cls, raw: bytes | str) -> HandoffRecord:
        d = json.loads(raw)
        return cls(
            id=d["id"],
            session=d["session"],
            state=d["state"],
            trigger=d.get("trigger", ""),
            reason=d.get("reason", ""),
            queue=d.get("queue", "general"),
            requested=int(d.get("requested") or 0),
            customer=d.get("customer", ""),
            offered_to=d.get("offered_to") or "",
            offer_until=int(d.get("offer_until") or 0),
            agent=d.get("agent") or "",
            agent_name=d.get("agent_name") or "",
            joined=int(d.get("joined") or 0),
            grace_until=int(d.get("grace_until") or 0),
            ended=int(d.get("ended") or 0),
            outcome=d.get("outcome") or "",
            disposition=d.get("disposition") or "",
            turn_id=d.get("turn_id") or "",
        )

    @property
    def waiting(self) -> bool:
        return self.state in ("queued", "offered")


@dataclass(frozen=True)
class AgentRecord:
    """An agent known to the tenant's desk."""

    id: str
    name: str
    skills: tuple[str, ...]
    max: int
    status: str
    """`available`, `away` or `offline`."""
    active: tuple[str, ...] = ()
    offers: tuple[str, ...] = ()
    seen: int = 0

    @classmethod
    def from_json(cls, raw: bytes | str) -> AgentRecord:
        d = json.loads(raw)
        return cls(
            id=d["id"],
            name=d.get("name", ""),
            skills=_ids(d.get("skills")),
            max=int(d.get("max") or 1),
            status=d.get("status", "offline"),
            active=_ids(d.get("active")),
            offers=_ids(d.get("offers")),
            seen=int(d.get("seen") or 0),
        )

    def serves(self, queue: str) -> bool:
        return queue == "general" or queue in self.skills


@dataclass(frozen=True)
class DeskSnapshot:
    """A tenant's open handoffs and agents, read in one round trip."""

    handoffs: tuple[HandoffRecord, ...]
    agents: tuple[AgentRecord, ...]
    ewma_wait_ms: int | None

    def queued(self, queue: str | None = None) -> list[HandoffRecord]:
        """Waiting handoffs, oldest first (per queue when `queue` is given)."""
        waiting = [h for h in self.handoffs if h.waiting and queue in (None, h.queue)]
        return sorted(waiting, key=lambda h: (h.requested, h.id))

    def position(self, handoff: HandoffRecord) -> int:
        """1-based place in its queue."""
        return 1 + sum(
            1
            for h in self.queued(handoff.queue)
            if (h.requested, h.id) < (handoff.requested, handoff.id)
        )

    def agents_for(self, queue: str, now_ms: int, stale_ms: int) -> int:
        return sum(
            1
            for a in self.agents
            if a.status == "available" and now_ms - a.seen <= stale_ms and a.serves(queue)
        )

    def by_id(self, handoff_id: str) -> HandoffRecord | None:
        return next((h for h in self.handoffs if h.id == handoff_id), None)


@dataclass(frozen=True)
class RelayEntry:
    """One entry of a session's relay log."""

    entry_id: str
    seq: int
    kind: str
    handoff_id: str
    event: bytes
    """A `korero.chat.v1.Event` without its seq, for the customer's stream ('' if none)."""
    body: dict[str, Any] = field(default_factory=dict)
    """What the agent desk needs (a customer message), if anything."""

    @classmethod
    def from_fields(cls, entry_id: bytes | str, fields: dict[bytes, bytes]) -> RelayEntry:
        raw_body = fields.get(b"body", b"")
        return cls(
            entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
            seq=int(fields.get(b"seq", b"0")),
            kind=fields.get(b"kind", b"").decode(),
            handoff_id=fields.get(b"hid", b"").decode(),
            event=fields.get(b"ev", b""),
            body=json.loads(raw_body) if raw_body else {},
        )

"""The report: how a tenant's conversations went over a period, from PostgreSQL.

A *conversation* is a session with at least one message or handoff in the
period; it was *contained* when no handoff of it was requested in the
period (the bot resolved it without a person) — a customer who asked for a
person and then left the queue (outcome `abandoned`) was not contained
either: the bot did not resolve it. Read from `messages`
(migration 0001: the bot's turns, written through the session outbox) and
`handoffs` (migration 0002, written by report/recorder.py).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

__all__ = ["Report", "build_report", "parse_since"]

_SINCE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(raw: str) -> timedelta:
    """`7d`, `24h`, `30m`, `2w`, `90s`."""
    match = _SINCE.match(raw.strip().lower())
    if not match:
        raise ValueError(f"--since takes a number and a unit (s, m, h, d, w), e.g. 7d; got {raw!r}")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


@dataclass(frozen=True)
class Report:
    """One tenant's figures for one period (all counts within the period)."""

    tenant: str
    since: str
    until: str
    conversations: int
    contained: int
    containment_rate: float | None
    handoffs: int
    handoff_rate: float | None
    handoffs_by_trigger: dict[str, int] = field(default_factory=dict)
    handoff_rate_by_trigger: dict[str, float] = field(default_factory=dict)
    agent_joined: int = 0
    abandoned: int = 0
    """Handoffs that ended before an agent joined (the customer left the queue)."""
    median_agent_wait_seconds: float | None = None
    turns: int = 0
    """The bot's answers (hand-over notices not counted)."""
    p95_time_to_first_token_ms: float | None = None
    cached_answers: int = 0
    cache_hit_rate: float | None = None
    tokens_saved_estimate: int = 0
    top_intents: list[tuple[str, int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["top_intents"] = [{"intent": i, "turns": n} for i, n in self.top_intents]
        return out


# The bot's answers in the period, without the turns that only said "a person
# is coming" (those escalated: their turn id is on the handoff).
_ANSWERS = """
answers AS (
    SELECT m.* FROM messages m
    WHERE m.tenant = $1 AND m.created_at >= $2 AND m.created_at < $3
      AND m.role = 'assistant'
      AND NOT EXISTS (
          SELECT 1 FROM handoffs h
          WHERE h.tenant = m.tenant AND h.session_id = m.session_id AND h.turn_id = m.turn_id)
)"""
_CONVERSATIONS = """
SELECT count(*) AS conversations,
       count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM handoffs h
           WHERE h.tenant = $1 AND h.session_id = s.session_id
             AND h.requested_at >= $2 AND h.requested_at < $3)) AS contained
FROM (
    SELECT session_id FROM messages
    WHERE tenant = $1 AND created_at >= $2 AND created_at < $3
    UNION
    SELECT session_id FROM handoffs
    WHERE tenant = $1 AND requested_at >= $2 AND requested_at < $3
) s
"""
_BY_TRIGGER = """
SELECT trigger, count(*) AS n FROM handoffs
WHERE tenant = $1 AND requested_at >= $2 AND requested_at < $3
GROUP BY trigger ORDER BY n DESC, trigger
"""
_WAIT = """
SELECT count(*) AS joined,
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM joined_at - requested_at)) AS median_wait
FROM handoffs
WHERE tenant = $1 AND requested_at >= $2 AND requested_at < $3 AND joined_at IS NOT NULL
"""
_ABANDONED = """
SELECT count(*) AS n FROM handoffs
WHERE tenant = $1 AND requested_at >= $2 AND requested_at < $3 AND outcome = 'abandoned'
"""
_TURNS = (
    "WITH"
    + _ANSWERS
    + """
SELECT count(*) AS answers,
       percentile_cont(0.95) WITHIN GROUP (
           ORDER BY (timings->>'time_to_first_token')::double precision * 1000)
           FILTER (WHERE timings ? 'time_to_first_token') AS p95_ttft,
       count(*) FILTER (WHERE cached) AS cached,
       avg(COALESCE((usage->>'input')::bigint, 0) + COALESCE((usage->>'output')::bigint, 0))
           FILTER (WHERE NOT cached
                   AND COALESCE((usage->>'input')::bigint, 0)
                       + COALESCE((usage->>'output')::bigint, 0) > 0) AS avg_tokens
FROM answers
"""
)
_INTENTS = """
SELECT intent, count(*) AS n FROM messages
WHERE tenant = $1 AND created_at >= $2 AND created_at < $3 AND role = 'user' AND intent <> ''
GROUP BY intent ORDER BY n DESC, intent LIMIT $4
"""


async def _one(conn: asyncpg.Connection, sql: str, *args: Any) -> asyncpg.Record:
    row = await conn.fetchrow(sql, *args)
    assert row is not None  # aggregates always return one row
    return row


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


async def build_report(
    conn: asyncpg.Connection,
    tenant: str,
    since: timedelta,
    *,
    now: datetime | None = None,
    top: int = 5,
) -> Report:
    """The report for `tenant` over the `since` before `now`."""
    until = now or datetime.now(tz=UTC)
    start = until - since
    args = (tenant, start, until)
    conv = await _one(conn, _CONVERSATIONS, *args)
    by_trigger = {r["trigger"]: int(r["n"]) for r in await conn.fetch(_BY_TRIGGER, *args)}
    wait = await _one(conn, _WAIT, *args)
    abandoned = await _one(conn, _ABANDONED, *args)
    turns = await _one(conn, _TURNS, *args)
    intents = [(r["intent"], int(r["n"])) for r in await conn.fetch(_INTENTS, *args, top)]
    conversations = int(conv["conversations"])
    contained = int(conv["contained"])
    handoffs = sum(by_trigger.values())
    cached = int(turns["cached"])
    answered = int(turns["answers"])
    avg_tokens = float(turns["avg_tokens"] or 0.0)
    return Report(
        tenant=tenant,
        since=start.isoformat(timespec="seconds"),
        until=until.isoformat(timespec="seconds"),
        conversations=conversations,
        contained=contained,
        containment_rate=_rate(contained, conversations),
        handoffs=handoffs,
        handoff_rate=_rate(conversations - contained, conversations),
        handoffs_by_trigger=by_trigger,
        handoff_rate_by_trigger={
            t: r for t, n in by_trigger.items() if (r := _rate(n, conversations)) is not None
        },
        agent_joined=int(wait["joined"]),
        abandoned=int(abandoned["n"]),
        median_agent_wait_seconds=None
        if wait["median_wait"] is None
        else round(float(wait["median_wait"]), 3),
        turns=answered,
        p95_time_to_first_token_ms=None
        if turns["p95_ttft"] is None
        else round(float(turns["p95_ttft"]), 1),
        cached_answers=cached,
        cache_hit_rate=_rate(cached, answered),
        tokens_saved_estimate=round(cached * avg_tokens),
        top_intents=intents,
    )


def render(report: Report) -> str:
    """The report as a table for the terminal."""

    def pct(rate: float | None) -> str:
        return "—" if rate is None else f"{rate * 100:.1f} %"

    lines = [
        f"Kōrero report · tenant {report.tenant} · {report.since} → {report.until}",
        "",
        f"{'conversations':<30}{report.conversations:>8}",
        f"{'contained (no person)':<30}{report.contained:>8}   {pct(report.containment_rate)}",
        f"{'handed to a person':<30}{report.conversations - report.contained:>8}   "
        f"{pct(report.handoff_rate)}",
    ]
    for trigger, n in report.handoffs_by_trigger.items():
        lines.append(
            f"{'  ' + trigger:<30}{n:>8}   {pct(report.handoff_rate_by_trigger.get(trigger))}"
        )
    lines.append(
        f"{'  abandoned in the queue':<30}{report.abandoned:>8}   "
        f"{pct(_rate(report.abandoned, report.conversations))}"
    )
    wait = report.median_agent_wait_seconds
    lines.append(
        f"{'median wait for an agent':<30}{'—' if wait is None else f'{wait:.1f} s':>8}   "
        f"({report.agent_joined} joined)"
    )
    ttft = report.p95_time_to_first_token_ms
    lines.append(
        f"{'p95 time to first token':<30}{'—' if ttft is None else f'{ttft:.0f} ms':>8}   "
        f"({report.turns} turns)"
    )
    lines.append(
        f"{'answers from the cache':<30}{report.cached_answers:>8}   {pct(report.cache_hit_rate)}"
        f" of answers, ~{report.tokens_saved_estimate:,} tokens saved"
    )
    intents = " · ".join(f"{i} {n}" for i, n in report.top_intents) or "—"
    lines.append(f"{'top intents':<30}{intents}")
    return "\n".join(lines)

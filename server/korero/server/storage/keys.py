"""The Redis key layout: every key Kōrero writes is named here, and only here.

Every key starts with `kr:` and a hash tag holding the tenant, so one
tenant's keys can never be read through another tenant's name, and the keys
that one Lua script touches share a Redis Cluster slot:

    kr:{t:s}:meta | history | turns     one session (see `sessions.py`)
    kr:{t:s}:relay                      the session's handoff relay log (stream)
    kr:{t:desk}:handoffs | sessions | agents | stats | queues | queue:<q>
                                        a tenant's agent desk (see handoff/)
    kr:{t:desk}:wh:<target> | wh:<target>:dead | wh:<target>:lease
                                        a tenant's webhook outbox per endpoint
    kr:{t:s}:outbox                     its writes on their way to PostgreSQL
    kr:{t:s}:events                     its event log, replayed on resume
    kr:{outbox}:pending                 sessions with outbox entries (ids only,
                                        no data: the one key without a tenant)
    kr:{t:kb}:meta | chunks:<v> | cache:<v>:…   a tenant's knowledge base
                                        and response cache (see context/)
    kr:{t:auth}:apikeys                 a tenant's API keys (see policy/)
    kr:{t:tools}                        a tenant's tools (see tools/)
    kr:{t:tools}:result:<name>:<v>:<a>  a cached result of a non-personal tool
                                        (v: the tool's config hash, a: its arguments')
    kr:{t}:rl:…                         a tenant's rate-limit buckets

Pub/sub channels follow the same layout (`kr:{t:s}:notify` wakes whoever
relays a session, `kr:{t:desk}:notify` whoever serves a tenant's desk), so
one pattern subscription per instance, `NOTIFY_PATTERN`, hears them all.
"""

from __future__ import annotations

__all__ = [
    "NOTIFY_PATTERN",
    "OUTBOX_PENDING",
    "api_keys_key",
    "desk_channel",
    "desk_key",
    "kb_key",
    "parse_notify_channel",
    "parse_pending_member",
    "pending_member",
    "rate_limit_key",
    "session_channel",
    "session_key",
    "tool_result_key",
    "tools_key",
]

NOTIFY_PATTERN = "kr:{*}:notify"
"""Matches every session and desk channel."""
_DESK = "desk"
OUTBOX_PENDING = "kr:{outbox}:pending"
"""Sorted set: `pending_member(tenant, session)` -> a counter bumped on every outbox write."""


def session_key(tenant: str, session_id: str, part: str) -> str:
    """The key of one part of a session: `meta`, `history`, `turns`, `outbox` or `events`."""
    return f"kr:{{{tenant}:{session_id}}}:{part}"


def kb_key(tenant: str, part: str) -> str:
    """The key of one part of a tenant's knowledge base (`""` gives the prefix)."""
    return f"kr:{{{tenant}:kb}}:{part}"


def api_keys_key(tenant: str) -> str:
    """The hash of a tenant's API keys (SHA-256 of the key -> record)."""
    return f"kr:{{{tenant}:auth}}:apikeys"


def rate_limit_key(tenant: str, part: str) -> str:
    """A tenant's token bucket: `requests`, `tokens` or `session:<id>`."""
    return f"kr:{{{tenant}}}:rl:{part}"


def desk_key(tenant: str, part: str) -> str:
    """A key of a tenant's agent desk (queues, handoffs, agents, webhook outbox)."""
    return f"kr:{{{tenant}:{_DESK}}}:{part}"


def session_channel(tenant: str, session_id: str) -> str:
    """The channel announcing new entries in a session's relay log."""
    return session_key(tenant, session_id, "notify")


def desk_channel(tenant: str) -> str:
    """The channel announcing changes at a tenant's desk."""
    return desk_key(tenant, "notify")


def parse_notify_channel(channel: str) -> tuple[str, str | None] | None:
    """(tenant, session id) of a session channel, (tenant, None) of a desk channel."""
    if not (channel.startswith("kr:{") and channel.endswith("}:notify")):
        return None
    tag = channel[4 : -len("}:notify")]
    tenant, sep, rest = tag.partition(":")
    if not sep or not tenant or not rest:
        return None
    return (tenant, None) if rest == _DESK else (tenant, rest)


def pending_member(tenant: str, session_id: str) -> str:
    """A session's member in `OUTBOX_PENDING`."""
    return f"{tenant}\t{session_id}"


def parse_pending_member(member: bytes | str) -> tuple[str, str]:
    text = member.decode() if isinstance(member, bytes) else member
    tenant, _, session_id = text.partition("\t")
    return tenant, session_id


def tools_key(tenant: str) -> str:
    """The hash of a tenant's tools (name -> JSON form)."""
    return f"kr:{{{tenant}:tools}}"


def tool_result_key(tenant: str, name: str, version: str, arguments_digest: str) -> str:
    """A cached result of tool `name` at config hash `version` for one set of arguments."""
    return f"kr:{{{tenant}:tools}}:result:{name}:{version}:{arguments_digest}"

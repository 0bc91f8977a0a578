"""The Redis key layout: every key Kōrero writes is named here, and only here.

Every key starts with `kr:` and a hash tag holding the tenant, so one
tenant's keys can never be read through another tenant's name, and the keys
that one Lua script touches share a Redis Cluster slot:

    kr:{t:s}:meta | history | turns     one session (see `sessions.py`)
    kr:{t:kb}:meta | chunks:<v> | cache:<v>:…   a tenant's knowledge base
                                        and response cache (see context/)
    kr:{t:auth}:apikeys                 a tenant's API keys (see policy/)
    kr:{t:tools}                        a tenant's tools (see tools/)
    kr:{t}:rl:…                         a tenant's rate-limit buckets
"""

from __future__ import annotations

__all__ = ["api_keys_key", "kb_key", "rate_limit_key", "session_key", "tools_key"]


def session_key(tenant: str, session_id: str, part: str) -> str:
    """The key of one part of a session: `meta`, `history` or `turns`."""
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


def tools_key(tenant: str) -> str:
    """The hash of a tenant's tools (name -> JSON form)."""
    return f"kr:{{{tenant}:tools}}"

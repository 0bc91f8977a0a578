"""Where a tenant's tools live: one Redis hash per tenant.

``kr:{<tenant>:tools}`` maps a tool's name to its JSON form. The tenant is
in the key's hash tag, so one tenant's tools sit in one cluster slot and no
lookup can reach another tenant's tools.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from korero.server.storage.boundary import redis_boundary
from korero.server.storage.keys import tools_key
from korero.server.tools._spec import ToolSpec, ToolSpecError

__all__ = ["ToolRegistry", "tools_key"]


class ToolRegistry:
    """A tenant's tools in Redis: add, remove, list, and load for a turn.

    Redis failures surface as `KoreroError` (the storage boundary's table).
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def put(self, tenant: str, spec: ToolSpec) -> bool:
        """Store `spec` (replacing a tool of the same name); True if it is new."""
        async with redis_boundary():
            added = await self._redis.hset(tools_key(tenant), spec.name, json.dumps(spec.to_dict()))
        return bool(added)

    async def remove(self, tenant: str, name: str) -> bool:
        """Delete the tool `name`; True if it existed."""
        async with redis_boundary():
            return bool(await self._redis.hdel(tools_key(tenant), name))

    async def list(self, tenant: str) -> list[ToolSpec]:
        """The tenant's tools, sorted by name; unparseable entries are skipped."""
        async with redis_boundary():
            raw = await self._redis.hgetall(tools_key(tenant))
        specs = []
        for value in raw.values():
            try:
                specs.append(ToolSpec.from_dict(json.loads(value)))
            except (ValueError, ToolSpecError):
                continue
        return sorted(specs, key=lambda s: s.name)

"""Results of non-personal tools, kept in Redis for a short while.

A flight's status is the same for every customer who asks about it within a
minute, so a successful result of a tool that is *not* personal is stored
under the tenant's tools hash tag, keyed by the tool's name, a hash of its
configuration (a changed endpoint or schema never serves an old result) and
a hash of the validated arguments in canonical JSON. Personal tools, and
calls that did not succeed, are never stored.

The cache is an optimisation only: a Redis failure on a lookup counts as a
miss and a failed write is dropped, so the call goes through as usual.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from korero.server.errors import KoreroError
from korero.server.storage.boundary import redis_boundary
from korero.server.storage.keys import tool_result_key
from korero.server.tools._spec import ToolSpec

__all__ = ["CachedResult", "ToolResultCache", "arguments_digest", "spec_version"]

log = logging.getLogger(__name__)

LOOKUP_WAIT = 0.5
"""Longest wait for Redis on a lookup or a write before treating it as a miss."""


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def spec_version(spec: ToolSpec) -> str:
    """A short hash of the tool's whole configuration."""
    return hashlib.sha256(_canonical(spec.to_dict())).hexdigest()[:16]


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """The hash of the arguments in canonical JSON (key order does not matter)."""
    return hashlib.sha256(_canonical(dict(arguments))).hexdigest()


@dataclass(frozen=True)
class CachedResult:
    """A stored result: the data and its citation label, as first fetched."""

    data: Any
    source: str


class ToolResultCache:
    """Successful results of non-personal tools in Redis, each for `ttl` seconds."""

    def __init__(self, redis: aioredis.Redis, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive (leave the cache out to turn it off)")
        self._redis = redis
        self._ttl_ms = max(1, int(ttl * 1000))

    @staticmethod
    def key(tenant: str, spec: ToolSpec, arguments: Mapping[str, Any]) -> str:
        return tool_result_key(tenant, spec.name, spec_version(spec), arguments_digest(arguments))

    async def get(
        self, tenant: str, spec: ToolSpec, arguments: Mapping[str, Any]
    ) -> CachedResult | None:
        """The stored result, or None (a miss, a personal tool, or Redis failing)."""
        if spec.personal:
            return None
        try:
            async with asyncio.timeout(LOOKUP_WAIT), redis_boundary():
                raw = await self._redis.get(self.key(tenant, spec, arguments))
        except (KoreroError, TimeoutError) as exc:
            log.warning("tool.cache_unavailable tool=%s op=get error=%s", spec.name, exc)
            return None
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
            return CachedResult(entry["data"], str(entry["source"]))
        except (ValueError, TypeError, KeyError):
            return None

    async def put(
        self, tenant: str, spec: ToolSpec, arguments: Mapping[str, Any], data: Any, source: str
    ) -> None:
        """Store a successful result of a non-personal tool; failures are logged and dropped."""
        if spec.personal:
            return
        value = json.dumps({"data": data, "source": source}, ensure_ascii=False)
        try:
            async with asyncio.timeout(LOOKUP_WAIT), redis_boundary():
                await self._redis.set(self.key(tenant, spec, arguments), value, px=self._ttl_ms)
        except (KoreroError, TimeoutError) as exc:
            log.warning("tool.cache_unavailable tool=%s op=put error=%s", spec.name, exc)

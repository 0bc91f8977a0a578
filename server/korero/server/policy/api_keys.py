"""API keys: `kr_<tenant>_<secret>`, stored hashed in Redis per tenant.

The tenant in the key picks the keyspace it is looked up in,
`kr:{<tenant>:auth}:apikeys` (a hash from the SHA-256 of the whole key to its
record), so a key can only ever resolve to its own tenant. The secret is 32
random bytes, so a plain SHA-256 is the right hash (no password stretching
is needed for high-entropy secrets).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from korero.server.storage.boundary import redis_boundary
from korero.server.storage.keys import api_keys_key

__all__ = [
    "ApiKeyRecord",
    "ApiKeyStore",
    "api_key_tenant",
    "key_digest",
    "looks_like_api_key",
    "valid_tenant",
]

_TENANT = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_KEY = re.compile(r"^kr_([a-z0-9][a-z0-9-]{0,62})_([A-Za-z0-9_-]{20,})$")


def valid_tenant(tenant: str) -> bool:
    """Tenant names: 1-63 characters of a-z 0-9 -, starting alphanumeric."""
    return bool(_TENANT.match(tenant))


def looks_like_api_key(token: str) -> bool:
    return token.startswith("kr_")


def api_key_tenant(key: str) -> str | None:
    """The tenant a well-formed key names (None: not a well-formed key)."""
    match = _KEY.match(key)
    return match.group(1) if match else None


def key_digest(key: str) -> str:
    """What is stored for a key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyRecord:
    """What is stored for an API key (never the key itself)."""

    key_id: str
    tenant: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    revoked_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "key_id": self.key_id,
                "tenant": self.tenant,
                "name": self.name,
                "scopes": list(self.scopes),
                "created_at": self.created_at,
                "revoked_at": self.revoked_at,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ApiKeyRecord:
        d = json.loads(raw)
        return cls(
            d["key_id"],
            d["tenant"],
            d.get("name", ""),
            tuple(d.get("scopes") or ()),
            d["created_at"],
            d.get("revoked_at"),
        )


class ApiKeyStore:
    """API keys of every tenant, each tenant in its own Redis key."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    async def create(
        self, tenant: str, name: str = "", scopes: tuple[str, ...] = ()
    ) -> tuple[str, ApiKeyRecord]:
        """A new key (returned once, in clear) and its stored record."""
        if not valid_tenant(tenant):
            raise ValueError("tenant must be 1-63 characters of a-z 0-9 -, starting alphanumeric")
        key = f"kr_{tenant}_{secrets.token_urlsafe(32)}"
        digest = key_digest(key)
        record = ApiKeyRecord(digest[:12], tenant, name, tuple(sorted(scopes)), time.time())
        async with redis_boundary():
            await self._redis.hset(api_keys_key(tenant), digest, record.to_json())
        return key, record

    async def list(self, tenant: str) -> list[ApiKeyRecord]:
        async with redis_boundary():
            raw = await self._redis.hgetall(api_keys_key(tenant))
        records = [ApiKeyRecord.from_json(v) for v in raw.values()]
        return sorted(records, key=lambda r: r.created_at)

    async def revoke(self, tenant: str, key_id: str) -> bool:
        """Mark a key revoked; False when no key has that id."""
        async with redis_boundary():
            raw = await self._redis.hgetall(api_keys_key(tenant))
        for digest, value in raw.items():
            record = ApiKeyRecord.from_json(value)
            if record.key_id == key_id and record.revoked_at is None:
                revoked = ApiKeyRecord(
                    record.key_id,
                    record.tenant,
                    record.name,
                    record.scopes,
                    record.created_at,
                    time.time(),
                )
                async with redis_boundary():
                    await self._redis.hset(api_keys_key(tenant), digest, revoked.to_json())
                return True
        return False

    async def lookup(self, key: str) -> ApiKeyRecord | None:
        """The record of a presented key, or None (unknown, malformed)."""
        match = _KEY.match(key)
        if not match:
            return None
        async with redis_boundary():
            raw = await self._redis.hget(api_keys_key(match.group(1)), key_digest(key))
        return ApiKeyRecord.from_json(raw) if raw else None

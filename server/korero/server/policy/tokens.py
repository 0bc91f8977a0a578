"""Authentication: API keys stored hashed in Redis, and JWTs (PyJWT).

Both arrive as `authorization: Bearer <token>`:

- API keys look like `kr_<tenant>_<secret>`. The tenant in the key picks the
  keyspace it is looked up in, `kr:{<tenant>:auth}:apikeys` (a hash from the
  SHA-256 of the whole key to its record), so a key can only ever resolve to
  its own tenant. The secret is 32 random bytes, so a plain SHA-256 is the
  right hash (no password stretching is needed for high-entropy secrets).
- JWTs are validated against a shared secret (HS256) or a JWKS URL, with the
  algorithms, audience and issuer pinned; the tenant comes from a claim.

`TokenAuthenticator` implements the transport-neutral `Authenticator`
protocol; `AuthInterceptor` applies it to every gRPC call and makes the
identity available to the servicer through a context variable.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import jwt
import redis.asyncio as aioredis
import redis.exceptions as rexc

from korero.server.errors import KoreroError
from korero.server.policy.identity import Identity
from korero.server.settings import AuthSettings
from korero.server.storage.sessions import translate_redis_error
from korero.server.transport.interceptors import refusal

__all__ = [
    "ApiKeyRecord",
    "ApiKeyStore",
    "AuthInterceptor",
    "JwksCache",
    "TokenAuthenticator",
    "current_identity",
    "refused_by_auth",
    "scope_for_method",
]

log = logging.getLogger(__name__)

_TENANT = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_KEY = re.compile(r"^kr_([a-z0-9][a-z0-9-]{0,62})_([A-Za-z0-9_-]{20,})$")

_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "korero_identity", default=None
)
_refused: contextvars.ContextVar[bool] = contextvars.ContextVar("korero_refused", default=False)

# The scope each method needs from a key or token that carries scopes.
_METHOD_SCOPES = {
    "/korero.chat.v1.ChatService/Chat": "chat:write",
    "/korero.chat.v1.ChatService/SendMessage": "chat:write",
    "/korero.chat.v1.ChatService/GetSession": "chat:read",
    "/korero.chat.v1.ChatService/ListMessages": "chat:read",
}


def current_identity() -> Identity | None:
    """The identity of the call being served (set by `AuthInterceptor`)."""
    return _identity.get()


def refused_by_auth() -> bool:
    """True while `AuthInterceptor` is refusing the call being intercepted."""
    return _refused.get()


def scope_for_method(method: str) -> str | None:
    return _METHOD_SCOPES.get(method)


def _unauthenticated(reason: str, message: str) -> KoreroError:
    return KoreroError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def valid_tenant(tenant: str) -> bool:
    return bool(_TENANT.match(tenant))


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


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyStore:
    """API keys of every tenant, each tenant in its own Redis key."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    @staticmethod
    def redis_key(tenant: str) -> str:
        return f"kr:{{{tenant}:auth}}:apikeys"

    async def create(
        self, tenant: str, name: str = "", scopes: tuple[str, ...] = ()
    ) -> tuple[str, ApiKeyRecord]:
        """A new key (returned once, in clear) and its stored record."""
        if not valid_tenant(tenant):
            raise ValueError("tenant must be 1-63 characters of a-z 0-9 -, starting alphanumeric")
        key = f"kr_{tenant}_{secrets.token_urlsafe(32)}"
        digest = _digest(key)
        record = ApiKeyRecord(digest[:12], tenant, name, tuple(sorted(scopes)), time.time())
        await self._redis.hset(self.redis_key(tenant), digest, record.to_json())
        return key, record

    async def list(self, tenant: str) -> list[ApiKeyRecord]:
        raw = await self._redis.hgetall(self.redis_key(tenant))
        records = [ApiKeyRecord.from_json(v) for v in raw.values()]
        return sorted(records, key=lambda r: r.created_at)

    async def revoke(self, tenant: str, key_id: str) -> bool:
        """Mark a key revoked; False when no key has that id."""
        raw = await self._redis.hgetall(self.redis_key(tenant))
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
                await self._redis.hset(self.redis_key(tenant), digest, revoked.to_json())
                return True
        return False

    async def lookup(self, key: str) -> ApiKeyRecord | None:
        """The record of a presented key, or None (unknown, malformed)."""
        match = _KEY.match(key)
        if not match:
            return None
        raw = await self._redis.hget(self.redis_key(match.group(1)), _digest(key))
        return ApiKeyRecord.from_json(raw) if raw else None


class JwksCache:
    """Signing keys from a JWKS URL, refetched at a bounded rate."""

    def __init__(self, url: str, refetch_interval: float, ttl: float = 600.0) -> None:
        self._url = url
        self._refetch_interval = refetch_interval
        self._ttl = ttl
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def get(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        stale = now - self._fetched_at > self._ttl
        if (kid not in self._keys or stale) and now - self._fetched_at >= self._refetch_interval:
            async with self._lock:
                if time.monotonic() - self._fetched_at >= self._refetch_interval:
                    await self._fetch()
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        self._fetched_at = time.monotonic()
        self.fetches += 1
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self._url) as response,
            ):
                response.raise_for_status()
                document = await response.json(content_type=None)
            keys = {}
            for entry in document.get("keys", []):
                if "kid" in entry:
                    keys[entry["kid"]] = jwt.PyJWK(entry)
            self._keys = keys
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWKError) as exc:
            log.warning("event=jwks_fetch_failed error=%s", type(exc).__name__)


class TokenAuthenticator:
    """API keys and JWTs, per settings. Implements `Authenticator`."""

    def __init__(
        self,
        settings: AuthSettings,
        keys: ApiKeyStore,
        jwks: JwksCache | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._clock = clock
        self._cache: dict[str, tuple[float, Identity]] = {}
        if jwks is None and settings.jwks_url:
            jwks = JwksCache(settings.jwks_url, settings.jwks_refetch_interval)
        self._jwks = jwks
        default = "RS256,ES256" if settings.jwks_url else "HS256"
        algorithms = settings.jwt_algorithms or default
        self._algorithms = [a.strip() for a in algorithms.split(",") if a.strip()]
        if any(a.lower() == "none" for a in self._algorithms):
            raise ValueError("KORERO_JWT_ALGORITHMS must not include 'none'")

    async def authenticate(self, authorization: str | None) -> Identity:
        if not authorization:
            raise _unauthenticated("CREDENTIALS_MISSING", "send `authorization: Bearer <token>`")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthenticated("CREDENTIALS_MALFORMED", "expected `Bearer <token>`")
        if token.startswith("kr_"):
            return await self._api_key(token)
        if token.count(".") == 2:
            return await self._jwt(token)
        raise _unauthenticated("CREDENTIALS_INVALID", "the token is not a Kōrero key or a JWT")

    async def _api_key(self, key: str) -> Identity:
        digest = _digest(key)
        cached = self._cache.get(digest)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            record = await self._keys.lookup(key)
        except (rexc.RedisError, OSError) as exc:
            raise translate_redis_error(exc) from exc
        if record is None:
            raise _unauthenticated("API_KEY_INVALID", "unknown API key")
        if record.revoked_at is not None:
            raise _unauthenticated("API_KEY_REVOKED", "this API key has been revoked")
        identity = Identity(record.tenant, f"key:{record.key_id}", frozenset(record.scopes))
        if self._settings.key_cache_seconds > 0:
            self._cache[digest] = (now + self._settings.key_cache_seconds, identity)
            if len(self._cache) > 10_000:
                self._cache.clear()
        return identity

    async def _jwt(self, token: str) -> Identity:
        s = self._settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _unauthenticated("TOKEN_INVALID", "malformed token") from None
        if (
            str(header.get("alg", "")).lower() == "none"
            or header.get("alg") not in self._algorithms
        ):
            raise _unauthenticated("TOKEN_ALGORITHM_REJECTED", "token algorithm not accepted")
        key: Any
        if self._jwks is not None:
            jwk = await self._jwks.get(str(header.get("kid", "")))
            if jwk is None:
                raise _unauthenticated("TOKEN_KEY_UNKNOWN", "token signed by an unknown key id")
            key = jwk.key
        elif s.jwt_secret:
            key = s.jwt_secret
        else:
            raise _unauthenticated("TOKEN_NOT_ACCEPTED", "this server does not accept JWTs")
        options = {"require": ["exp", "aud"] + (["iss"] if s.jwt_issuer else [])}
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=s.jwt_audience,
                issuer=s.jwt_issuer or None,
                options=options,  # type: ignore[arg-type]
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthenticated("TOKEN_EXPIRED", "token has expired") from None
        except jwt.InvalidAudienceError:
            raise _unauthenticated(
                "TOKEN_AUDIENCE_REJECTED", "token is for another audience"
            ) from None
        except jwt.InvalidIssuerError:
            raise _unauthenticated("TOKEN_ISSUER_REJECTED", "token from another issuer") from None
        except jwt.InvalidSignatureError:
            raise _unauthenticated(
                "TOKEN_SIGNATURE_INVALID", "token signature is invalid"
            ) from None
        except jwt.InvalidTokenError as exc:
            raise _unauthenticated(
                "TOKEN_INVALID", f"token rejected ({type(exc).__name__})"
            ) from None
        tenant = claims.get(s.jwt_tenant_claim)
        if not isinstance(tenant, str) or not valid_tenant(tenant):
            raise _unauthenticated(
                "TOKEN_TENANT_MISSING", f"token has no valid `{s.jwt_tenant_claim}`"
            )
        scope = claims.get("scope", "")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
        return Identity(tenant, f"jwt:{claims.get('sub', '')}", scopes)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call except the open ones; rejects with a typed status."""

    def __init__(self, authenticator: Any, settings: AuthSettings) -> None:
        self._authenticator = authenticator
        self._open = tuple(p.strip() for p in settings.open_methods.split(",") if p.strip())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode()
        # Checked before the inner interceptors run, so they (the rate limiter)
        # see the caller's identity, or that the call is being refused.
        refused: KoreroError | None = None
        try:
            identity = await self._authenticator.authenticate(authorization)
            needed = scope_for_method(method)
            if identity.scopes and needed and needed not in identity.scopes:
                raise KoreroError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "SCOPE_MISSING",
                    f"this credential lacks the `{needed}` scope",
                )
            _identity.set(identity)
        except KoreroError as error:
            refused = error
            _refused.set(True)
        handler = await continuation(handler_call_details)
        if refused is None or handler is None:
            return handler
        return refusal(handler, refused)

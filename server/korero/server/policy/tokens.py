"""Authentication: API keys (see `api_keys.py`) and JWTs (PyJWT).

Both arrive as `authorization: Bearer <token>`:

- API keys look like `kr_<tenant>_<secret>` and resolve only to their tenant.
- JWTs are validated against a shared secret (HS256) or a JWKS URL, with the
  algorithms, audience and issuer pinned; the tenant comes from a claim.

`TokenAuthenticator` implements the transport-neutral `Authenticator`
protocol; the `CallGate` (gate.py) calls it for every transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import jwt

from korero.server.errors import KoreroError
from korero.server.policy.api_keys import (
    ApiKeyStore,
    api_key_tenant,
    key_digest,
    looks_like_api_key,
    valid_tenant,
)
from korero.server.policy.identity import Identity
from korero.server.settings import AuthSettings

__all__ = ["JwksCache", "TokenAuthenticator"]

log = logging.getLogger(__name__)


_KNOWN_GOOD_SECONDS = 3600.0
_KNOWN_GOOD_MAX = 10_000


def _bearer(authorization: str | None) -> str | None:
    """The token of `Bearer <token>`, else None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _unauthenticated(reason: str, message: str) -> KoreroError:
    return KoreroError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


class JwksCache:
    """Signing keys from a JWKS URL, refetched at a bounded rate."""

    def __init__(
        self,
        url: str,
        refetch_interval: float,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._url = url
        self._refetch_interval = refetch_interval
        self._ttl = ttl
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def get(self, kid: str) -> jwt.PyJWK | None:
        now = self._clock()
        stale = now - self._fetched_at > self._ttl
        if (kid not in self._keys or stale) and now - self._fetched_at >= self._refetch_interval:
            async with self._lock:
                if self._clock() - self._fetched_at >= self._refetch_interval:
                    await self._fetch()
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        self._fetched_at = self._clock()
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
        # Digests of keys that verified here lately: never throttled (see throttle.py).
        self._known_good: dict[str, float] = {}
        if jwks is None and settings.jwks_url:
            jwks = JwksCache(settings.jwks_url, settings.jwks_refetch_interval)
        self._jwks = jwks
        default = ("RS256", "ES256") if settings.jwks_url else ("HS256",)
        self._algorithms = list(settings.jwt_algorithms or default)
        if any(a.lower() == "none" for a in self._algorithms):
            raise ValueError("KORERO_JWT_ALGORITHMS must not include 'none'")

    def throttle_key(self, authorization: str | None) -> str | None:
        """The tenant to throttle failures under, for credentials whose check would
        look up an unknown API key in Redis; None for everything else (keys that
        verified here lately, JWTs and malformed values cost no lookup)."""
        token = _bearer(authorization)
        if token is None or not looks_like_api_key(token):
            return None
        digest = key_digest(token)
        seen = self._known_good.get(digest)
        if seen is not None and self._clock() - seen < _KNOWN_GOOD_SECONDS:
            return None
        return api_key_tenant(token)

    async def authenticate(self, authorization: str | None) -> Identity:
        if not authorization:
            raise _unauthenticated("CREDENTIALS_MISSING", "send `authorization: Bearer <token>`")
        token = _bearer(authorization)
        if token is None:
            raise _unauthenticated("CREDENTIALS_MALFORMED", "expected `Bearer <token>`")
        if looks_like_api_key(token):
            return await self._api_key(token)
        if token.count(".") == 2:
            return await self._jwt(token)
        raise _unauthenticated("CREDENTIALS_INVALID", "the token is not a Kōrero key or a JWT")

    async def _api_key(self, key: str) -> Identity:
        digest = key_digest(key)
        cached = self._cache.get(digest)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        record = await self._keys.lookup(key)  # Redis errors arrive translated
        if record is None:
            raise _unauthenticated("API_KEY_INVALID", "unknown API key")
        if record.revoked_at is not None:
            self._known_good.pop(digest, None)
            raise _unauthenticated("API_KEY_REVOKED", "this API key has been revoked")
        identity = Identity(record.tenant, f"key:{record.key_id}", frozenset(record.scopes))
        if len(self._known_good) >= _KNOWN_GOOD_MAX:
            self._known_good.clear()
        self._known_good[digest] = now
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

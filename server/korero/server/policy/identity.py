"""Who is calling: the seam every transport uses to turn credentials into a tenant.

The gRPC servicer and the WebSocket adapter both call an `Authenticator`
with the raw `authorization` value (e.g. `Bearer <token>`) and use the
returned `Identity.tenant` for every key they touch. Until authentication is
configured, `AnonymousAuthenticator` maps every caller to the configured
default tenant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["AnonymousAuthenticator", "Authenticator", "Identity"]


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    tenant: str
    subject: str = "anonymous"
    scopes: frozenset[str] = field(default_factory=frozenset)


class Authenticator(Protocol):
    """Turns an `authorization` header value into an identity.

    Raises `KoreroError` (UNAUTHENTICATED) when the credentials are missing
    or invalid.
    """

    async def authenticate(self, authorization: str | None) -> Identity: ...


class AnonymousAuthenticator:
    """Every caller is the default tenant (no authentication configured)."""

    def __init__(self, tenant: str) -> None:
        self._identity = Identity(tenant=tenant)

    async def authenticate(self, authorization: str | None) -> Identity:
        return self._identity

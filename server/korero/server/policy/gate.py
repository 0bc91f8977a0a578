"""The call gate: throttle → authenticate → scope → the tenant's call limit, in one place.

Every transport asks the same `CallGate` before serving a call: the gRPC
interceptor (transport/interceptors.py) for each RPC, the WebSocket adapter
for each socket. The gate returns the caller's `Identity` or raises a
`KoreroError` (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED,
UNAVAILABLE); what the transport does with a refusal is its own framing.

Failed API-key checks are throttled per client address and per tenant
before the Redis lookup they cost (`throttle.py`); a transport that knows the
address passes it as `peer`.

Scopes follow from the method, not from a table: a method of
`korero.<domain>.v<N>.<Service>` needs `<domain>:read` when it is a standard
read (AIP-131/132: `Get…`, `List…`) and `<domain>:write` otherwise. A
credential without scopes may call everything of its tenant.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from korero.server.errors import KoreroError
from korero.server.policy.identity import Authenticator, Identity
from korero.server.policy.ratelimit import RateLimiter
from korero.server.policy.throttle import AuthFailureThrottle

__all__ = ["CallGate", "scope_for_method"]

_READ_PREFIXES = ("Get", "List")


def scope_for_method(method: str) -> str | None:
    """The scope `/korero.<domain>.vN.Service/Method` needs; None for other services."""
    service, _, name = method.strip("/").rpartition("/")
    parts = service.split(".")
    if len(parts) < 4 or parts[0] != "korero" or not name:
        return None
    access = "read" if name.startswith(_READ_PREFIXES) else "write"
    return f"{parts[1]}:{access}"


class CallGate:
    """Decides whether a call may start, for every transport."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        open_methods: tuple[str, ...],
        default_tenant: str,
        limiter: RateLimiter | None = None,
        authenticates: bool = True,
        throttle: AuthFailureThrottle | None = None,
        throttle_key: Callable[[str | None], str | None] | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._anonymous = Identity(tenant=default_tenant)
        self._open = open_methods
        self._limiter = limiter
        self._authenticates = authenticates
        self._throttle = throttle if throttle_key is not None else None
        self._throttle_key = throttle_key or (lambda _authorization: None)

    @property
    def checks_anything(self) -> bool:
        """False when every call would pass unchecked (no auth, no limits)."""
        return self._authenticates or self._limiter is not None

    def needs_peer(self, method: str, authorization: str | None) -> bool:
        """Whether `admit` wants the client's address: its credentials would cost a
        lookup that failed-authentication throttling guards."""
        return (
            self._throttle is not None
            and not self.is_open(method)
            and self._throttle_key(authorization) is not None
        )

    def is_open(self, method: str) -> bool:
        """Methods that need no credentials and cost nothing (health, reflection)."""
        return method.startswith(self._open)

    async def admit(
        self, method: str, authorization: str | None, peer: str | None = None
    ) -> Identity:
        """The caller's identity, or a `KoreroError` refusing the call.

        Open methods pass without checks, as the default tenant. `peer` (the
        client's address) lets failed API-key checks be throttled per address
        as well as per tenant (throttle.py).
        """
        if self.is_open(method):
            return self._anonymous
        guarded = self._throttle_key(authorization) if self._throttle is not None else None
        if self._throttle is not None and guarded is not None:
            # Before the lookup it would cost: a failure is reserved up front, so
            # concurrent guesses cannot all slip past an almost empty bucket.
            self._throttle.check(peer, guarded)
            self._throttle.failed(peer, guarded)
        try:
            identity = await self._authenticator.authenticate(authorization)
        except KoreroError as error:
            if (
                self._throttle is not None
                and guarded is not None
                and error.code != grpc.StatusCode.UNAUTHENTICATED
            ):
                self._throttle.refund(peer, guarded)  # not a failed check (e.g. Redis down)
            raise
        if self._throttle is not None and guarded is not None:
            self._throttle.refund(peer, guarded)
        needed = scope_for_method(method)
        if identity.scopes and needed is not None and needed not in identity.scopes:
            raise KoreroError(
                grpc.StatusCode.PERMISSION_DENIED,
                "SCOPE_MISSING",
                f"this credential lacks the `{needed}` scope",
            )
        if self._limiter is not None:
            await self._limiter.admit_call(identity.tenant)  # a refused caller costs nothing
        return identity

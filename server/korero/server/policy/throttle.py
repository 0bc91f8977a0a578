"""Failed-authentication throttling: guessing keys is cheap for nobody.

Every API key that is not known here costs a Redis lookup to check. A client
guessing keys (34,131 in 10 s were measured) makes every guess such a lookup
and slows everyone else down. `AuthFailureThrottle` counts failed API-key
checks in process, in token buckets per client address and per tenant named
by the key (`KORERO_AUTH_FAILURES_PER_PEER`, `KORERO_AUTH_FAILURES_PER_TENANT`
per minute, refilling evenly). While either bucket is empty, keys that would
need a lookup are refused before it: RESOURCE_EXHAUSTED `AUTH_THROTTLED` with
RetryInfo, and each refusal is reported to `on_throttled` with the bucket that
was empty (`peer` or `tenant`: `korero_auth_throttled_total{scope}`). Keys that
verified here before are never throttled (see
`TokenAuthenticator.throttle_key`), so a real client keeps working while its
tenant or its address is under attack.

In process, on purpose: it must cost less than the lookup it saves, and each
instance protects its own Redis traffic. Behind a proxy (Envoy) the address
is the proxy's: the per-address bucket then covers everyone behind it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from korero.server.errors import KoreroError

__all__ = ["AuthFailureThrottle", "peer_address"]

_WINDOW = 60.0  # the limits are per minute
_MAX_TRACKED = 10_000  # buckets kept per kind; beyond it the fullest are forgotten


def peer_address(peer: str | None) -> str | None:
    """The client's address without its port: gRPC's `ipv4:1.2.3.4:5678`,
    `ipv6:[::1]:5678`, or a bare address (aiohttp's `request.remote`)."""
    if not peer:
        return None
    kind, sep, rest = peer.partition(":")
    if sep and kind in ("ipv4", "ipv6"):
        peer = rest
        if peer.startswith("["):
            return peer[1 : peer.index("]")] if "]" in peer else peer
        return peer.rsplit(":", 1)[0]
    return peer


@dataclass
class _Bucket:
    level: float
    at: float


class _Buckets:
    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self._capacity = float(per_minute)
        self._rate = per_minute / _WINDOW
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _refill(self, key: str) -> _Bucket | None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            now = self._clock()
            bucket.level = min(self._capacity, bucket.level + (now - bucket.at) * self._rate)
            bucket.at = now
        return bucket

    def wait(self, key: str) -> float:
        """Seconds until a failure may be spent for `key` (0: now)."""
        bucket = self._refill(key)
        if bucket is None or bucket.level >= 1:
            return 0.0
        return (1 - bucket.level) / self._rate

    def refund(self, key: str) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.level = min(self._capacity, bucket.level + 1)

    def spend(self, key: str) -> None:
        bucket = self._refill(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_TRACKED:
                self._forget()
            bucket = self._buckets[key] = _Bucket(self._capacity, self._clock())
        bucket.level = max(0.0, bucket.level - 1)

    def _forget(self) -> None:
        """Drop the buckets that are (nearly) full: they hold no memory worth keeping."""
        for key in [k for k, b in self._buckets.items() if b.level >= self._capacity - 1]:
            del self._buckets[key]
        if len(self._buckets) >= _MAX_TRACKED:
            self._buckets.clear()


class AuthFailureThrottle:
    """Failed API-key checks per client address and per tenant, in process."""

    def __init__(
        self,
        *,
        per_peer: int,
        per_tenant: int,
        clock: Callable[[], float] = time.monotonic,
        on_throttled: Callable[[str], None] = lambda _scope: None,
    ) -> None:
        self._on_throttled = on_throttled
        self._peers = _Buckets(per_peer, clock) if per_peer > 0 else None
        self._tenants = _Buckets(per_tenant, clock) if per_tenant > 0 else None

    def check(self, peer: str | None, tenant: str) -> None:
        """Refuse (RESOURCE_EXHAUSTED) while `peer` or `tenant` has no failures left."""
        wait = 0.0
        limit = ""
        address = peer_address(peer)
        if self._peers is not None and address is not None:
            wait, limit = self._peers.wait(address), "peer"
        if self._tenants is not None and wait == 0:
            wait, limit = self._tenants.wait(tenant), "tenant"
        if wait > 0:
            self._on_throttled(limit)
            raise KoreroError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "AUTH_THROTTLED",
                f"too many failed authentications; retry in {wait:.1f}s",
                retryable=True,
                retry_after=wait,
                metadata={"limit": f"auth_failures_per_{limit}"},
            )

    def refund(self, peer: str | None, tenant: str) -> None:
        """Give back a failure reserved for a check that did not fail."""
        address = peer_address(peer)
        if self._peers is not None and address is not None:
            self._peers.refund(address)
        if self._tenants is not None:
            self._tenants.refund(tenant)

    def failed(self, peer: str | None, tenant: str) -> None:
        """Count one failed check against `peer` and `tenant`."""
        address = peer_address(peer)
        if self._peers is not None and address is not None:
            self._peers.spend(address)
        if self._tenants is not None:
            self._tenants.spend(tenant)

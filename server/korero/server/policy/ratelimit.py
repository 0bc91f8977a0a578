"""Rate limits: token buckets in Redis, checked atomically by one Lua script.

Three limits, each a bucket refilling evenly over the window (60 s, so the
numbers are per minute):

    session_messages   messages one session may send
    tenant_requests    new calls plus messages, per tenant
    tenant_tokens      LLM prompt + completion tokens, per tenant

Why a Lua script and not the `limits` library: a message must pass all three
limits or consume none of them, and a token reservation must later be
settled against the same bucket; one script that checks every bucket and
then debits them all, timed by Redis `TIME` (so instances with skewed clocks
agree), does both in a single round trip. `limits` checks one limit per call
and has no settle-with-debt operation.

Token limits reserve `estimated prompt tokens + max_tokens` before the LLM
call and settle to the real usage when the turn ends (a cancel refunds what
was not used). A settlement may push a bucket below zero (the estimate was
low); later requests then wait until it refills, so N instances together
never exceed a limit by more than what was in flight.

All buckets of a tenant share the tenant's hash tag (`kr:{t}:rl:...`), so the
script touches one Redis Cluster slot.

When Redis cannot be reached, the policy in settings applies: `local` fails
open to a per-process limiter with the same limits (counted in a metric),
`closed` rejects with UNAVAILABLE.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from korero.server.errors import RateLimitedError, StoreUnavailableError
from korero.server.settings import RateLimitSettings
from korero.server.storage.boundary import redis_boundary
from korero.server.storage.keys import rate_limit_key
from korero.server.storage.scripts import ScriptCall

__all__ = [
    "Admission",
    "LocalBuckets",
    "RateLimiter",
    "Tier",
    "parse_tiers",
]

log = logging.getLogger(__name__)

_BUCKETS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local force = ARGV[1] == 'force'
local n = #KEYS
local levels = {}
local ok = true
local wait = 0
local blocked = 0
for i = 1, n do
  local cap = tonumber(ARGV[3 * i - 1])
  local rate = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local b = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or cap
  local ts = tonumber(b[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
  levels[i] = tokens
  if not force and cost > 0 and tokens < cost then
    ok = false
    local w = (cost - tokens) / rate
    if cost > cap then w = -1 end
    if blocked == 0 or w > wait or w < 0 then wait = w; blocked = i end
  end
end
local out = {ok and 1 or 0, tostring(wait), blocked}
for i = 1, n do
  local cap = tonumber(ARGV[3 * i - 1])
  local rate = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local tokens = levels[i]
  if ok then tokens = math.min(cap, tokens - cost) end
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((cap - math.min(tokens, 0)) / rate) + 1000)
  out[#out + 1] = tostring(tokens)
end
return out
"""


@dataclass(frozen=True)
class Tier:
    """The three limits, per minute (per window)."""

    session_messages: int
    tenant_requests: int
    tenant_tokens: int


def parse_tiers(settings: RateLimitSettings) -> tuple[Tier, dict[str, Tier]]:
    """The default tier and each tenant's tier (tiers are parsed and checked in settings)."""
    default = Tier(
        settings.session_messages_per_minute,
        settings.tenant_requests_per_minute,
        settings.tenant_tokens_per_minute,
    )
    named = {
        name: Tier(
            spec.get("session_messages_per_minute", default.session_messages),
            spec.get("tenant_requests_per_minute", default.tenant_requests),
            spec.get("tenant_tokens_per_minute", default.tenant_tokens),
        )
        for name, spec in settings.tiers.tiers.items()
    }
    return default, {tenant: named[tier] for tenant, tier in settings.tiers.tenants.items()}


@dataclass(frozen=True)
class Admission:
    """An admitted request: what it reserved and what is left."""

    tenant: str
    reserved_tokens: int = 0
    remaining_requests: int = 0
    remaining_tokens: int = 0
    reset_after: float = 0.0
    closest: str = ""
    local: bool = False


@dataclass
class _Bucket:
    tokens: float
    ts: float


@dataclass
class LocalBuckets:
    """The same token buckets in process memory (the Redis-down fallback)."""

    clock: Callable[[], float] = time.monotonic
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    def apply(
        self, specs: Sequence[tuple[str, float, float, float]], force: bool
    ) -> tuple[bool, float, int, list[float]]:
        now = self.clock() * 1000
        levels = []
        ok, wait, blocked = True, 0.0, 0
        for i, (key, cap, rate, cost) in enumerate(specs, start=1):
            b = self.buckets.get(key) or _Bucket(cap, now)
            tokens = min(cap, b.tokens + max(0.0, now - b.ts) * rate)
            levels.append(tokens)
            if not force and cost > 0 and tokens < cost:
                ok = False
                w = (cost - tokens) / rate if cost <= cap else -1.0
                if blocked == 0 or w > wait or w < 0:
                    wait, blocked = w, i
        out = []
        for (key, cap, _rate, cost), tokens in zip(specs, levels, strict=True):
            level = min(cap, tokens - cost) if ok else tokens
            self.buckets[key] = _Bucket(level, now)
            out.append(level)
        if len(self.buckets) > 100_000:
            self.buckets.clear()
        return ok, wait, blocked, out


@dataclass(frozen=True)
class _Spec:
    name: str
    key: str
    capacity: int
    rate: float  # tokens per millisecond
    cost: float


class RateLimiter:
    """Checks and debits the limits of a tenant and its sessions."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: RateLimitSettings,
        on_fallback: Callable[[], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._redis = client
        self._settings = settings
        self._default, self._tenants = parse_tiers(settings)
        self._window_ms = settings.window_seconds * 1000
        self._script = client.register_script(_BUCKETS)
        self._local = LocalBuckets()
        self._on_fallback = on_fallback or (lambda: None)
        self._on_reject = on_reject or (lambda _limit: None)

    @property
    def enabled(self) -> bool:
        return self._settings.enabled

    def tier(self, tenant: str) -> Tier:
        return self._tenants.get(tenant, self._default)

    def _spec(self, name: str, tenant: str, session_id: str, cost: float) -> _Spec:
        tier = self.tier(tenant)
        if name == "session_messages":
            key, capacity = rate_limit_key(tenant, f"session:{session_id}"), tier.session_messages
        elif name == "tenant_requests":
            key, capacity = rate_limit_key(tenant, "requests"), tier.tenant_requests
        else:
            key, capacity = rate_limit_key(tenant, "tokens"), tier.tenant_tokens
        return _Spec(name, key, capacity, capacity / self._window_ms, cost)

    @staticmethod
    def _args(specs: Sequence[_Spec], force: bool) -> tuple[list[str], list[Any]]:
        args: list[Any] = ["force" if force else "check"]
        for spec in specs:
            args += [spec.capacity, repr(spec.rate), spec.cost]
        return [spec.key for spec in specs], args

    async def _apply(
        self, specs: list[_Spec], force: bool
    ) -> tuple[bool, float, int, list[float], bool]:
        keys, args = self._args(specs, force)
        try:
            async with redis_boundary():
                out = await self._script(keys=keys, args=args)
        except StoreUnavailableError as exc:
            if self._settings.redis_down == "closed":
                raise StoreUnavailableError("rate limiter unavailable") from exc
            self._on_fallback()
            local = [(sp.key, float(sp.capacity), sp.rate, sp.cost) for sp in specs]
            ok, wait, blocked, levels = self._local.apply(local, force)
            return ok, wait, blocked, levels, True
        levels = [float(v) for v in out[3:]]
        return bool(int(out[0])), float(out[1]), int(out[2]), levels, False

    def _reject(self, specs: list[_Spec], wait: float, blocked: int) -> RateLimitedError:
        limit = specs[blocked - 1].name
        self._on_reject(limit)
        if wait < 0:  # the request alone exceeds the bucket: waiting will not help
            return RateLimitedError(limit, self._settings.window_seconds)
        return RateLimitedError(limit, max(0.001, wait / 1000))

    async def admit_call(self, tenant: str) -> Admission:
        """A new call (stream or unary) of `tenant`: one tenant request."""
        if not self.enabled:
            return Admission(tenant)
        specs = [self._spec("tenant_requests", tenant, "", 1)]
        ok, wait, blocked, levels, local = await self._apply(specs, force=False)
        if not ok:
            raise self._reject(specs, wait, blocked)
        return Admission(tenant, remaining_requests=math.floor(levels[0]), local=local)

    async def admit_message(self, tenant: str, session_id: str, tokens: int) -> Admission:
        """A user message: one session message, one tenant request, `tokens` reserved."""
        if not self.enabled:
            return Admission(tenant)
        specs = [
            self._spec("session_messages", tenant, session_id, 1),
            self._spec("tenant_requests", tenant, session_id, 1),
            self._spec("tenant_tokens", tenant, session_id, tokens),
        ]
        ok, wait, blocked, levels, local = await self._apply(specs, force=False)
        if not ok:
            raise self._reject(specs, wait, blocked)
        fractions = [lvl / spec.capacity for lvl, spec in zip(levels, specs, strict=True)]
        deficit = max(
            (spec.capacity - lvl) / spec.rate for lvl, spec in zip(levels, specs, strict=True)
        )
        return Admission(
            tenant,
            reserved_tokens=tokens,
            remaining_requests=math.floor(min(levels[0], levels[1])),
            remaining_tokens=math.floor(levels[2]),
            reset_after=deficit / 1000,
            closest=specs[fractions.index(min(fractions))].name,
            local=local,
        )

    def settlement(self, admission: Admission, used_tokens: int) -> ScriptCall | None:
        """The call charging real usage against the reservation (refund or debt).

        Returned rather than run, so the caller can put it in the pipeline that
        ends the turn (no extra round trip).
        """
        if not self.enabled or admission.local or used_tokens == admission.reserved_tokens:
            return None
        spec = self._spec(
            "tenant_tokens", admission.tenant, "", used_tokens - admission.reserved_tokens
        )
        keys, args = self._args([spec], force=True)
        return ScriptCall(self._script, keys, args)

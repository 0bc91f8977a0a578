"""CRM / ticketing webhooks: a transactional outbox in Redis, delivered in order.

On `handoff.requested`, `handoff.agent_joined` and `handoff.closed` a JSON
event (schema: `docs/schemas/handoff-webhook.schema.json`) is appended to one
outbox list per endpoint of the tenant, by the same Lua step that changes the
handoff (handoff/scripts.py), so a state change and its webhook cannot be
apart. `WebhookDispatcher` delivers each list head first, one endpoint at a
time per cluster (a lease in Redis), so a receiver sees a handoff's events in
order:

    POST <url>
    Content-Type: application/json
    Korero-Event: handoff.agent_joined
    Idempotency-Key: <the event id: the same on every attempt>
    Korero-Timestamp: <unix seconds of this attempt>
    Korero-Signature: t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

A 2xx answer delivers it. Anything else (or no answer within
KORERO_WEBHOOK_TIMEOUT) is retried after an exponential backoff with full
jitter; after KORERO_WEBHOOK_MAX_ATTEMPTS the event moves to the endpoint's
dead-letter list (`korero webhooks list`, `korero webhooks retry`). Delivery
runs in its own tasks: a slow or failing receiver never delays a chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from korero.server.errors import KoreroError
from korero.server.settings import WebhookSettings, WebhookTarget
from korero.server.storage.boundary import redis_boundary
from korero.server.storage.keys import desk_key

__all__ = [
    "EVENT_TYPES",
    "DeadLetter",
    "WebhookDispatcher",
    "WebhookOutbox",
    "sign",
    "verify",
]

log = logging.getLogger(__name__)

EVENT_TYPES = ("handoff.requested", "handoff.agent_joined", "handoff.closed")
SIGNATURE_HEADER = "Korero-Signature"
_SEQUENCE = {t: i + 1 for i, t in enumerate(EVENT_TYPES)}
_LEASE_MS = 15_000


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `Korero-Signature` value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, *, now: float, tolerance: float = 300) -> bool:
    """What a receiver does: recompute the signature and reject stale timestamps."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


class WebhookOutbox:
    """Builds the outbox entries of an event for each endpoint of the tenant."""

    def __init__(self, settings: WebhookSettings) -> None:
        self._targets = settings.targets

    def targets(self, tenant: str) -> tuple[WebhookTarget, ...]:
        return self._targets.get(tenant, ())

    def entries(
        self, tenant: str, event_type: str, handoff: Mapping[str, Any], now_ms: int
    ) -> list[tuple[str, str]]:
        """[(target id, outbox entry JSON)] for `event_type` about `handoff`."""
        targets = [t for t in self.targets(tenant) if not t.events or event_type in t.events]
        if not targets:
            return []
        event_id = f"evt_{uuid.uuid4().hex}"
        body = json.dumps(
            {
                "id": event_id,
                "type": event_type,
                "created_at": _iso(now_ms),
                "tenant": tenant,
                "sequence": _SEQUENCE[event_type],
                "handoff": dict(handoff),
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )
        entry = json.dumps({"id": event_id, "type": event_type, "body": body, "attempts": 0})
        return [(t.target_id, entry) for t in targets]


@dataclass(frozen=True)
class DeadLetter:
    """A delivery that ran out of attempts."""

    tenant: str
    target: WebhookTarget
    event_id: str
    event_type: str
    attempts: int
    last_error: str
    body: str


# Pop the head only if it is still the entry we delivered (another instance may
# have taken over after our lease lapsed).
_POP_IF = """
local head = redis.call('LINDEX', KEYS[1], 0)
if head and cjson.decode(head).id == ARGV[1] then redis.call('LPOP', KEYS[1]) return 1 end
return 0
"""
_SET_HEAD_IF = """
local head = redis.call('LINDEX', KEYS[1], 0)
if head and cjson.decode(head).id == ARGV[1] then
  redis.call('LSET', KEYS[1], 0, ARGV[2])
  return 1
end
return 0
"""
_DEAD_IF = """
local head = redis.call('LINDEX', KEYS[1], 0)
if head and cjson.decode(head).id == ARGV[1] then
  redis.call('LPOP', KEYS[1])
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def queue_key(tenant: str, target: WebhookTarget) -> str:
    return desk_key(tenant, f"wh:{target.target_id}")


def dead_key(tenant: str, target: WebhookTarget) -> str:
    return desk_key(tenant, f"wh:{target.target_id}:dead")


class WebhookDispatcher:
    """Delivers every tenant endpoint's outbox, head first, with retries."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: WebhookSettings,
        *,
        on_result: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._redis = client
        self._settings = settings
        self._on_result = on_result or (lambda _r: None)
        self._rng = rng or random.Random()
        self._instance = uuid.uuid4().hex
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: dict[str, asyncio.Event] = {}
        self._http: aiohttp.ClientSession | None = None
        self._pop = client.register_script(_POP_IF)
        self._set_head = client.register_script(_SET_HEAD_IF)
        self._dead = client.register_script(_DEAD_IF)
        self._renew = client.register_script(_RENEW)

    def start(self) -> None:
        if not self._settings.targets:
            return
        self._http = aiohttp.ClientSession()
        for tenant, targets in self._settings.targets.items():
            self._wake[tenant] = asyncio.Event()
            for target in targets:
                self._tasks.append(
                    asyncio.create_task(self._worker(tenant, target), name="webhook-worker")
                )

    def wake(self, tenant: str) -> None:
        """Something was added to the tenant's outbox (a desk notification)."""
        event = self._wake.get(tenant)
        if event is not None:
            event.set()

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a delivery is idempotent, the next instance resends it
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _worker(self, tenant: str, target: WebhookTarget) -> None:
        lease = desk_key(tenant, f"wh:{target.target_id}:lease")
        key = queue_key(tenant, target)
        wake = self._wake[tenant]
        while not self._closing:
            try:
                async with redis_boundary():
                    held = await self._redis.set(lease, self._instance, nx=True, px=_LEASE_MS)
                    if not held:
                        held = bool(
                            await self._renew(keys=[lease], args=[self._instance, _LEASE_MS])
                        )
                if not held:  # another instance delivers this endpoint
                    await self._idle(wake, _LEASE_MS / 3000)
                    continue
                async with redis_boundary():
                    head = await self._redis.lindex(key, 0)
                if head is None:
                    await self._idle(wake, 1.0)
                    continue
                await self._deliver(tenant, target, key, json.loads(head))
            except KoreroError as error:
                log.warning("event=webhook_store_error reason=%s", error.reason)
                await asyncio.sleep(1.0)

    @staticmethod
    async def _idle(wake: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)
        wake.clear()

    async def _deliver(
        self, tenant: str, target: WebhookTarget, key: str, entry: dict[str, Any]
    ) -> None:
        due = float(entry.get("next_at", 0))
        if due > time.time():
            await asyncio.sleep(min(due - time.time(), _LEASE_MS / 3000))
            return
        error = await self._post(target, entry)
        attempts = int(entry.get("attempts", 0)) + 1
        if error is None:
            async with redis_boundary():
                await self._pop(keys=[key], args=[entry["id"]])
            self._on_result("delivered")
            log.info(
                "event=webhook_delivered tenant=%s type=%s attempts=%d",
                tenant,
                entry["type"],
                attempts,
            )
            return
        entry = {**entry, "attempts": attempts, "last_error": error}
        if attempts >= self._settings.max_attempts:
            async with redis_boundary():
                await self._dead(
                    keys=[key, dead_key(tenant, target)], args=[entry["id"], json.dumps(entry)]
                )
            self._on_result("dead_lettered")
            log.warning(
                "event=webhook_dead_lettered tenant=%s type=%s attempts=%d error=%s",
                tenant,
                entry["type"],
                attempts,
                error,
            )
            return
        cap = min(self._settings.backoff_max, self._settings.backoff * 2 ** (attempts - 1))
        entry["next_at"] = time.time() + self._rng.uniform(0, cap)  # full jitter
        async with redis_boundary():
            await self._set_head(keys=[key], args=[entry["id"], json.dumps(entry)])
        self._on_result("retried")

    async def _post(self, target: WebhookTarget, entry: dict[str, Any]) -> str | None:
        """None when delivered, else why not."""
        assert self._http is not None
        body = entry["body"].encode()
        now = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "Korero-Event": entry["type"],
            "Idempotency-Key": entry["id"],
            "Korero-Timestamp": str(now),
            SIGNATURE_HEADER: sign(target.secret, now, body),
        }
        try:
            async with self._http.post(
                target.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from exc  # our own shutdown, not the receiver
            return type(exc).__name__


async def dead_letters(
    client: aioredis.Redis, settings: WebhookSettings, tenant: str | None = None
) -> list[DeadLetter]:
    """Every dead letter (of one tenant, or all)."""
    out: list[DeadLetter] = []
    for name, targets in settings.targets.items():
        if tenant is not None and name != tenant:
            continue
        for target in targets:
            async with redis_boundary():
                raw = await client.lrange(dead_key(name, target), 0, -1)
            for item in raw:
                d = json.loads(item)
                out.append(
                    DeadLetter(
                        name,
                        target,
                        d["id"],
                        d["type"],
                        int(d.get("attempts", 0)),
                        d.get("last_error", ""),
                        d["body"],
                    )
                )
    return out


async def pending(client: aioredis.Redis, tenant: str, target: WebhookTarget) -> int:
    async with redis_boundary():
        return int(await client.llen(queue_key(tenant, target)))


_RETRY = """
local moved = 0
local items = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
for _, raw in ipairs(items) do
  local d = cjson.decode(raw)
  if ARGV[1] == '' or d.id == ARGV[1] then
    d.attempts = 0
    d.next_at = 0
    redis.call('RPUSH', KEYS[2], cjson.encode(d))
    moved = moved + 1
  else
    redis.call('RPUSH', KEYS[1], raw)
  end
end
if moved > 0 then redis.call('PUBLISH', ARGV[2], 'wh') end
return moved
"""


async def retry_dead_letters(
    client: aioredis.Redis, settings: WebhookSettings, tenant: str, event_id: str = ""
) -> int:
    """Put dead letters (all, or one by event id) back at the end of their queue."""
    moved = 0
    for target in settings.targets.get(tenant, ()):
        async with redis_boundary():
            moved += int(
                await client.eval(
                    _RETRY,
                    2,
                    dead_key(tenant, target),
                    queue_key(tenant, target),
                    event_id,
                    desk_key(tenant, "notify"),
                )
            )
    return moved

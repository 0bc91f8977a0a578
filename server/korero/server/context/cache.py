"""The response cache: answers to general policy questions, per tenant, in Redis.

Only turns the router marks `cacheable` are cached: policy questions with no
personal data and no reference to earlier turns. Their prompt holds nothing
but the system prompt, the retrieved knowledge-base chunks and the question
(context assembly leaves out customer facts and history for them), so the
answer is a function of exactly what the key covers:

    kr:{<tenant>:kb}:cache:<kb version>:<sha256(prompt version, model, normalized question)>

The tenant and KB version are in the key's name (a new ingest makes every old
entry unreachable, and its Lua deletes them); the hash covers the prompt
version, the model and the normalized question. Normalization
(`normalize_question`): Unicode NFKC, case folding, apostrophes removed
("what's" -> "whats"), every other non-letter/digit -> space, courtesy words
(please, hi, hello, hey, thanks, thank you, kindly, pls) dropped, whitespace
collapsed. Nothing else: two questions share an entry only when they differ
in case, punctuation, spacing or courtesy.

Round trips: the lookup is a Lua script on the tenant's KB hash slot that
reads the KB version, the entry and, on a miss, takes the single-flight lock
(SET NX PX). It rides in the same pipeline as the session's begin_turn, and
storing rides with finish_turn, so a cached or cacheable turn costs the same
two round trips as any other. Followers (identical misses while another
instance is generating) poll the same script until the entry appears, the
lock is released (they take it and generate) or `lock_timeout` passes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from korero.server.context.router import RouteDecision
from korero.server.settings import CacheSettings
from korero.server.storage.boundary import redis_boundary
from korero.server.storage.keys import kb_key
from korero.server.storage.scripts import ScriptCall

__all__ = [
    "CacheLookup",
    "CacheProbe",
    "CacheStats",
    "CachedAnswer",
    "ResponseCache",
    "normalize_question",
]

_COURTESY = frozenset({"please", "pls", "plz", "hi", "hello", "hey", "thanks", "kindly", "cheers"})
_APOSTROPHES = re.compile(r"['’`]")
_NON_WORD = re.compile(r"[\W_]+")


def normalize_question(text: str) -> str:
    """The question as it enters the cache key (see the module docstring)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = _APOSTROPHES.sub("", folded)
    words = _NON_WORD.sub(" ", folded).split()
    out: list[str] = []
    i = 0
    while i < len(words):
        if words[i] == "thank" and i + 1 < len(words) and words[i + 1] == "you":
            i += 2
            continue
        if words[i] not in _COURTESY:
            out.append(words[i])
        i += 1
    return " ".join(out)


@dataclass(frozen=True)
class CachedAnswer:
    """What a cache entry holds."""

    answer: str
    model: str
    citations: tuple[dict[str, Any], ...] = ()
    usage: dict[str, int] = field(default_factory=dict)
    created_ms: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "answer": self.answer,
                "model": self.model,
                "citations": list(self.citations),
                "usage": self.usage,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> CachedAnswer:
        d = json.loads(raw)
        return cls(
            answer=d["answer"],
            model=d.get("model", ""),
            citations=tuple(d.get("citations") or ()),
            usage=d.get("usage") or {},
            created_ms=int(d.get("created_ms", 0)),
        )


@dataclass(frozen=True)
class CacheLookup:
    """The reply of a probe: the KB version and what the cache said."""

    kb_version: int
    status: Literal["off", "hit", "leader", "follower"]
    entry: CachedAnswer | None = None
    age: float = 0.0
    """Seconds since the entry was stored (Redis clock)."""


@dataclass(frozen=True)
class CacheProbe:
    """A lookup to send with begin_turn; `parse` reads its reply."""

    tenant: str
    digest: str
    """Empty when the turn is not cacheable: the probe only reads the KB version."""
    token: str
    call: ScriptCall

    def parse(self, reply: Any) -> CacheLookup:
        version = int(reply[0])
        if not self.digest:
            return CacheLookup(version, "off")
        status = reply[1].decode()
        if status == "hit":
            entry = CachedAnswer.from_json(reply[2])
            return CacheLookup(
                version, "hit", entry, max(0, int(reply[3]) - entry.created_ms) / 1000
            )
        return CacheLookup(version, status)


@dataclass
class CacheStats:
    """Counters for metrics: lookups that hit or missed, and what hits saved."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    follower_waits: int = 0
    saved_tokens: int = 0


_PROBE = """
local version = redis.call('HGET', KEYS[1], 'version') or '0'
if ARGV[1] == '' then return {version} end
local entry = ARGV[4] .. 'cache:' .. version .. ':' .. ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hit = redis.call('GET', entry)
if hit then return {version, 'hit', hit, now} end
local lock = entry .. ':lock'
if redis.call('SET', lock, ARGV[2], 'NX', 'PX', ARGV[3]) then return {version, 'leader'} end
if redis.call('GET', lock) == ARGV[2] then return {version, 'leader'} end
return {version, 'follower'}
"""

_STORE = """
local entry = ARGV[4] .. 'cache:' .. ARGV[1] .. ':' .. ARGV[2]
local lock = entry .. ':lock'
if redis.call('GET', lock) == ARGV[5] then redis.call('DEL', lock) end
if ARGV[3] == '' then return 0 end
if (redis.call('HGET', KEYS[1], 'version') or '0') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local value = cjson.decode(ARGV[3])
value.created_ms = now
redis.call('SET', entry, cjson.encode(value), 'PX', ARGV[6])
local index = ARGV[4] .. 'cache:' .. ARGV[1] .. ':index'
redis.call('SADD', index, entry)
redis.call('PEXPIRE', index, ARGV[6])
return 1
"""


class ResponseCache:
    """Tenant-scoped answers keyed by KB version, prompt version, model and question."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: CacheSettings,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._redis = client
        self._settings = settings
        self._probe: AsyncScript = client.register_script(_PROBE)
        self._store: AsyncScript = client.register_script(_STORE)
        self._clock = clock or time.monotonic
        self.stats = CacheStats()

    @property
    def settings(self) -> CacheSettings:
        return self._settings

    @staticmethod
    def digest(prompt_version: str, model: str, question: str) -> str:
        """The hashed part of the key (nothing personal goes in: only cacheable turns)."""
        material = "\x1f".join((prompt_version, model, normalize_question(question)))
        return hashlib.sha256(material.encode()).hexdigest()

    def probe(
        self, tenant: str, question: str, route: RouteDecision, prompt_version: str, model: str
    ) -> CacheProbe:
        """A lookup for this turn (only reads the KB version when it is not cacheable)."""
        cacheable = self._settings.enabled and route.cacheable
        digest = self.digest(prompt_version, model, question) if cacheable else ""
        token = secrets.token_hex(8)
        call = ScriptCall(
            self._probe,
            (kb_key(tenant, "meta"),),
            (digest, token, int(self._settings.lock_timeout * 1000), kb_key(tenant, "")),
        )
        return CacheProbe(tenant, digest, token, call)

    def record(self, lookup: CacheLookup) -> None:
        """Count a lookup's outcome in `stats`."""
        if lookup.status == "hit" and lookup.entry is not None:
            self.stats.hits += 1
            self.stats.saved_tokens += sum(int(v) for v in lookup.entry.usage.values())
        elif lookup.status in ("leader", "follower"):
            self.stats.misses += 1

    def store_call(
        self, probe: CacheProbe, kb_version: int, answer: CachedAnswer | None
    ) -> ScriptCall:
        """Store `answer` (or just release the lock when None); send it with finish_turn."""
        return ScriptCall(
            self._store,
            (kb_key(probe.tenant, "meta"),),
            (
                kb_version,
                probe.digest,
                answer.to_json() if answer is not None else "",
                kb_key(probe.tenant, ""),
                probe.token,
                self._settings.ttl * 1000,
            ),
        )

    async def release(self, probe: CacheProbe, kb_version: int) -> None:
        """Give up the single-flight lock without storing anything."""
        call = self.store_call(probe, kb_version, None)
        async with redis_boundary():
            await call.script(keys=list(call.keys), args=list(call.args))

    async def wait(self, probe: CacheProbe, kb_version: int, deadline: float) -> CacheLookup:
        """As a follower: wait for the leader's entry, or become the leader.

        Ends with `hit`, `leader` (the lock was freed, or `lock_timeout` passed:
        this turn generates itself) — never waits past `deadline`.
        """
        self.stats.follower_waits += 1
        limit = min(deadline, self._clock() + self._settings.lock_timeout)
        pause = 0.005
        while self._clock() < limit:
            await asyncio.sleep(min(pause, max(0.0, limit - self._clock())))
            pause = min(pause * 2, 0.1)
            async with redis_boundary():
                reply = await probe.call.script(
                    keys=list(probe.call.keys), args=list(probe.call.args)
                )
            lookup = probe.parse(reply)
            if lookup.status != "follower":
                return lookup
        return CacheLookup(kb_version, "leader")

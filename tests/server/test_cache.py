"""The response cache on real Redis and the simulated upstream: hits, single flight,
invalidation on ingest, tenant isolation, personal data, round trips."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.server.context.cache import normalize_question
from korero.server.settings import Settings
from korero.server.storage.sessions import SessionStore
from korero.sim import SimConfig, UpstreamSim
from tests.conftest import RedisProcess, make_settings
from tests.helpers import ingest_sample, kinds, of_kind, run_turn, text_of
from tests.server.test_store import CountingConnection

QUESTION = "What's the checked baggage allowance?"


@pytest.fixture
async def app(redis_url: str, settings: Settings) -> AsyncIterator[KoreroServer]:
    await ingest_sample(redis_url)
    server = await KoreroServer.start(settings)
    yield server
    await server.shutdown(grace=0)


def _cache_keys(redis_proc: RedisProcess, tenant: str = "default") -> list[str]:
    keys = redis_proc.client().keys(f"kr:{{{tenant}:kb}}:cache:*")
    return sorted(k.decode() for k in keys if not k.endswith((b":index", b":lock")))


def _shape(events: list[pb.Event]) -> list[str]:
    """Event kinds with runs of deltas and of citations collapsed."""
    out: list[str] = []
    for kind in kinds(events):
        if not out or out[-1] != kind:
            out.append(kind)
    return out


def test_normalization_ignores_case_punctuation_spacing_and_courtesy() -> None:
    same = [
        "What's the checked baggage allowance?",
        "  what’s the CHECKED baggage   allowance ",
        "Hi! What's the checked-baggage allowance, please?",
        "whats the checked baggage allowance thank you",
    ]
    assert {normalize_question(q) for q in same} == {"whats the checked baggage allowance"}
    assert normalize_question("What's the cabin baggage allowance?") != normalize_question(same[0])


async def test_a_hit_replays_the_answer_with_the_same_events_and_no_llm_call(
    app: KoreroServer, sim: UpstreamSim, redis_proc: RedisProcess
) -> None:
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        aroha = await client.conversation(metadata=pb.SessionMetadata(customer_name="Aroha"))
        first = await run_turn(aroha, QUESTION)
        mere = await client.conversation(metadata=pb.SessionMetadata(customer_name="Mere"))
        second = await run_turn(mere, "what's the CHECKED baggage allowance, please")
        history = await client.list_messages(mere.session_id)

    assert len(sim.requests) == 1  # the second answer came from the cache
    assert not first[-1].done.cached
    assert second[-1].done.cached
    assert second[-1].done.HasField("cache_age")
    assert (
        _shape(first)
        == _shape(second)
        == [
            "turn_started",
            "rate_limit",
            "text_delta",
            "citation",
            "usage",
            "done",
        ]
    )
    assert text_of(second) == text_of(first)
    assert "Aroha" not in text_of(first)  # a shareable prompt carries no customer facts
    assert [e.citation for e in of_kind(second, "citation")] == [
        e.citation for e in of_kind(first, "citation")
    ]
    assert second[0].turn_started.model == first[0].turn_started.model
    assert second[0].turn_started.intent == "policy_question"
    assert history.messages[-1].text == text_of(first)  # a cached answer is still history
    assert second[-1].done.usage.total_tokens == 0  # no tokens were spent on it
    stats = app.engine.cache.stats  # type: ignore[union-attr]
    assert (stats.hits, stats.misses, stats.stores) == (1, 1, 1)
    assert stats.saved_tokens == first[-1].done.usage.total_tokens > 0
    assert len(_cache_keys(redis_proc)) == 1


async def test_personal_turns_are_never_cached(
    app: KoreroServer, sim: UpstreamSim, redis_proc: RedisProcess
) -> None:
    question = "What's the baggage allowance for my flight to Auckland?"
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        for _ in range(2):
            conversation = await client.conversation()
            events = await run_turn(conversation, question)
            assert not events[-1].done.cached
    assert len(sim.requests) == 2
    assert _cache_keys(redis_proc) == []


async def test_identical_concurrent_misses_make_one_llm_call(
    app: KoreroServer, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(ttft=1.0)  # the leader answers late: all others start meanwhile
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        conversations = [await client.conversation() for _ in range(6)]
        results = await asyncio.gather(*(run_turn(c, QUESTION) for c in conversations))
    assert len(sim.requests) == 1
    assert len({text_of(events) for events in results}) == 1
    assert sorted(events[-1].done.cached for events in results) == [False] + [True] * 5
    assert app.engine.cache.stats.follower_waits == 5  # type: ignore[union-attr]


async def test_a_crashed_leader_does_not_block_followers(
    redis_url: str, sim: UpstreamSim, redis_proc: RedisProcess
) -> None:
    await ingest_sample(redis_url)
    app = await KoreroServer.start(make_settings(redis_url, sim.base_url, cache__lock_timeout=0.3))
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            first = await run_turn(await client.conversation(), "When does online check-in open?")
            # A leader that took the lock for another question and died: its lock stays.
            entry = _cache_keys(redis_proc)[0]
            sync = redis_proc.client()
            sync.delete(entry)
            sync.set(entry + ":lock", "dead-leader", px=60_000)
            started = time.monotonic()
            events = await run_turn(await client.conversation(), "When does online check-in open?")
            waited = time.monotonic() - started
    finally:
        await app.shutdown(grace=0)
    assert kinds(events)[-1] == "done"
    assert not events[-1].done.cached
    assert text_of(events) == text_of(first)
    assert 0.25 < waited < 5  # gave up on the lock after lock_timeout, then answered
    assert len(sim.requests) == 2


async def test_ingest_invalidates_cached_answers(
    app: KoreroServer, sim: UpstreamSim, redis_proc: RedisProcess, redis_url: str
) -> None:
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        assert not (await run_turn(await client.conversation(), QUESTION))[-1].done.cached
        assert (await run_turn(await client.conversation(), QUESTION))[-1].done.cached
        old = _cache_keys(redis_proc)
        assert len(old) == 1
        assert ":cache:1:" in old[0]

        assert await ingest_sample(redis_url) == 2  # a new KB version
        assert _cache_keys(redis_proc) == []  # the old version's answers are deleted

        again = await run_turn(await client.conversation(), QUESTION)
        assert not again[-1].done.cached
        assert len(sim.requests) == 2
        assert (await run_turn(await client.conversation(), QUESTION))[-1].done.cached
    assert ":cache:2:" in _cache_keys(redis_proc)[0]


async def test_tenants_never_share_cached_answers(
    redis_url: str, sim: UpstreamSim, redis_proc: RedisProcess
) -> None:
    apps = []
    for tenant in ("acme", "globex"):
        await ingest_sample(redis_url, tenant)
        apps.append(
            await KoreroServer.start(make_settings(redis_url, sim.base_url, engine__tenant=tenant))
        )
    try:
        cached = []
        for app in apps:
            async with ChatClient(f"127.0.0.1:{app.port}") as client:
                for _ in range(2):
                    events = await run_turn(await client.conversation(), QUESTION)
                    cached.append(events[-1].done.cached)
    finally:
        for app in apps:
            await app.shutdown(grace=0)
    assert cached == [False, True, False, True]  # each tenant's first ask is a miss
    assert len(sim.requests) == 2
    assert len(_cache_keys(redis_proc, "acme")) == 1
    assert len(_cache_keys(redis_proc, "globex")) == 1
    assert _cache_keys(redis_proc, "default") == []


async def test_the_cache_can_be_switched_off(redis_url: str, sim: UpstreamSim) -> None:
    """With no response cache at all, retrieval still reads the KB version on its own path."""
    await ingest_sample(redis_url)
    app = await KoreroServer.start(make_settings(redis_url, sim.base_url, cache__enabled=False))
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            for _ in range(2):
                events = await run_turn(await client.conversation(), QUESTION)
                assert not events[-1].done.cached
                assert of_kind(events, "citation")
    finally:
        await app.shutdown(grace=0)
    assert len(sim.requests) == 2
    assert all("Knowledge base excerpts" in r.body["messages"][0]["content"] for r in sim.requests)


@pytest.mark.standalone_redis  # counts or delays one server's socket
async def test_cached_and_uncached_turns_cost_three_round_trips(
    redis_proc: RedisProcess, redis_url: str, sim: UpstreamSim
) -> None:
    await ingest_sample(redis_url)
    settings = make_settings(redis_url, sim.base_url)
    pool = aioredis.BlockingConnectionPool(
        port=redis_proc.port, connection_class=CountingConnection, max_connections=8
    )
    store = SessionStore(aioredis.Redis(connection_pool=pool), settings.engine)
    app = await KoreroServer.start(settings, store=store)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            # Warm-up: loads the Lua scripts and this process's index of KB version 1
            # (one HGETALL per process and KB version, not per turn).
            await run_turn(conversation, "Do my points expire?", "w")
            sends = []
            for cmid, question in (("miss", QUESTION), ("hit", QUESTION.upper())):
                before = CountingConnection.sends
                events = await run_turn(conversation, question, cmid)
                sends.append(CountingConnection.sends - before)
                assert events[-1].done.cached is (cmid == "hit")
            # An idempotent retry replays the stored answer with its citations.
            replay = await run_turn(conversation, QUESTION, "miss")
    finally:
        await app.shutdown(grace=0)
    # rate-limit admission | begin (+ cache lookup) | finish (+ cache store + token
    # settlement), pipelined: the cache adds no round trip
    assert sends == [3, 3]
    assert replay[0].turn_started.replayed
    assert of_kind(replay, "citation")

"""Rate limits on real Redis: per message inside a stream, per call, per LLM
token with reservation and settlement, tiers, Redis outage policy, and
exactness across two server processes."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.server.errors import RateLimitedError, StoreUnavailableError
from korero.server.policy.ratelimit import RateLimiter
from korero.server.settings import RateLimitSettings, RateTiers
from korero.sim import SimConfig, UpstreamSim
from korero.testing import free_port
from tests.conftest import RedisProcess, make_settings
from tests.helpers import kinds, redis_client, run_turn
from tests.server.test_lifecycle import start_server_process

CODE = {c.value[0]: c for c in grpc.StatusCode}


async def _server(redis_url: str, sim: UpstreamSim, **limits: Any) -> KoreroServer:
    overrides = {f"limits__{k}": v for k, v in limits.items()}
    return await KoreroServer.start(make_settings(redis_url, sim.base_url, **overrides))


async def test_session_limit_applies_to_each_message_inside_the_stream(
    redis_url: str, sim: UpstreamSim
) -> None:
    app = await _server(redis_url, sim, session_messages_per_minute=3)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            for i in range(3):
                assert kinds(await run_turn(conversation, f"q{i}", f"m{i}"))[-1] == "done"
            events = await run_turn(conversation, "one too many", "m3")
            error = events[-1].error
            assert CODE[error.code] == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.reason == "RATE_LIMITED"
            assert error.retryable
            assert 0 < error.retry_after.ToNanoseconds() <= 20e9  # one message refills in 20 s
            assert len(sim.requests) == 3  # the LLM was not called
            history = await client.list_messages(conversation.session_id)
            assert len(history.messages) == 6  # the refused message was not stored
            # Another session of the same tenant is not affected.
            other = await client.conversation()
            assert kinds(await run_turn(other, "hello", "o1"))[-1] == "done"
    finally:
        await app.shutdown(grace=0)


async def test_new_calls_beyond_the_tenant_limit_get_resource_exhausted(
    redis_url: str, sim: UpstreamSim
) -> None:
    app = await _server(redis_url, sim, tenant_requests_per_minute=2)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            await client.conversation()  # request 1: the stream
            with pytest.raises(ChatError) as info:
                await client.get_session("whatever")  # 2: allowed, NOT_FOUND
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            for call in (client.get_session("whatever"), client.conversation()):
                with pytest.raises(ChatError) as info:
                    await call
                assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert info.value.reason == "RATE_LIMITED"
                assert info.value.retry_after is not None
                assert 0 < info.value.retry_after <= 30
    finally:
        await app.shutdown(grace=0)


async def test_turn_publishes_rate_limit_status(redis_url: str, sim: UpstreamSim) -> None:
    app = await _server(redis_url, sim, session_messages_per_minute=10)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            events = await run_turn(conversation, "hello", "r1")
            assert kinds(events)[:2] == ["turn_started", "rate_limit"]
            status = events[1].rate_limit
            assert status.remaining_requests == 9  # the session's 10 minus this message
            assert status.remaining_tokens > 0
            assert status.limit == "session_messages"
            assert status.reset_after.ToNanoseconds() > 0
    finally:
        await app.shutdown(grace=0)


async def _bucket(redis_url: str, tenant: str = "default") -> float:
    client = redis_client(redis_url)
    try:
        raw = await client.hget(f"kr:{{{tenant}}}:rl:tokens", "tokens")
    finally:
        await client.aclose()
    return float(raw or "nan")


def _refilled(per_minute: int, seconds: float) -> float:
    """The most a bucket of `per_minute` can refill in `seconds` (and a token of rounding)."""
    return per_minute * seconds / 60 + 1


async def test_tokens_are_reserved_then_settled_to_real_usage(
    redis_url: str, sim: UpstreamSim
) -> None:
    limit = 100_000
    app = await _server(redis_url, sim, tenant_tokens_per_minute=limit)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            began = time.monotonic()
            events = await run_turn(conversation, "What is the baggage allowance?", "t1")
            usage = events[-1].done.usage
            reserved = limit - events[1].rate_limit.remaining_tokens
            assert reserved >= 512  # at least max_tokens was reserved up front
            level = await _bucket(redis_url)
            # After settlement the bucket is down by the real usage, not the
            # reservation (plus what refilled while the turn ran).
            refill = _refilled(limit, time.monotonic() - began)
            assert limit - usage.total_tokens - 1 <= level <= limit - usage.total_tokens + refill
    finally:
        await app.shutdown(grace=0)


async def test_a_cancelled_turn_refunds_what_it_did_not_use(
    redis_url: str, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(tokens_per_second=20, answer_tokens=200)
    limit = 100_000
    app = await _server(redis_url, sim, tenant_tokens_per_minute=limit)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            events = []
            began = time.monotonic()
            async for event in conversation.send("Tell me everything", "c1"):
                events.append(event)
                if event.WhichOneof("kind") == "text_delta":
                    await conversation.cancel()
            assert events[-1].done.finish_reason == pb.FINISH_REASON_CANCELLED
            used = events[-1].done.usage.total_tokens
            assert used < 512
            level = await _bucket(redis_url)
            refill = _refilled(limit, time.monotonic() - began)
            assert limit - used - 1 <= level <= limit - used + refill
    finally:
        await app.shutdown(grace=0)


async def test_a_reservation_in_flight_holds_tokens_back_from_other_sessions(
    redis_url: str, sim: UpstreamSim
) -> None:
    # One turn reserves about max_tokens (512) + its prompt estimate; with 1,000
    # tokens a minute a second concurrent turn cannot reserve, while the first
    # is running. Once it settles to its real (small) usage, there is room again.
    sim.config = SimConfig(ttft=0.5, answer_tokens=10)
    app = await _server(redis_url, sim, tenant_tokens_per_minute=1000)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            a = await client.conversation()
            b = await client.conversation()
            first = asyncio.create_task(run_turn(a, "hello", "a1"))
            await sim.wait_for(lambda r: True)
            refused = await run_turn(b, "me too", "b1")
            assert refused[-1].error.reason == "RATE_LIMITED"
            assert "tenant_tokens" in refused[-1].error.message
            assert kinds(await first)[-1] == "done"
            sim.config = SimConfig()
            assert kinds(await run_turn(b, "me too", "b1"))[-1] == "done"
    finally:
        await app.shutdown(grace=0)


async def test_a_request_larger_than_the_whole_budget_is_refused(
    redis_url: str, sim: UpstreamSim
) -> None:
    app = await _server(redis_url, sim, tenant_tokens_per_minute=300)  # < max_tokens
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            events = await run_turn(conversation, "hello", "x1")
            assert events[-1].error.reason == "RATE_LIMITED"
            assert events[-1].error.retry_after.ToNanoseconds() == 60 * 10**9
            assert not sim.requests
    finally:
        await app.shutdown(grace=0)


async def test_tiers_give_tenants_different_limits(redis_url: str, sim: UpstreamSim) -> None:
    tiers = json.dumps(
        {"tiers": {"gold": {"tenant_requests_per_minute": 5}}, "tenants": {"gold-co": "gold"}}
    )
    limiter_settings = RateLimitSettings(tenant_requests_per_minute=2, tiers=RateTiers.parse(tiers))
    client = redis_client(redis_url)
    limiter = RateLimiter(client, limiter_settings)
    try:
        allowed = Counter[str]()
        for tenant in ("free-co", "gold-co"):
            for _ in range(8):
                try:
                    await limiter.admit_call(tenant)
                    allowed[tenant] += 1
                except RateLimitedError:
                    pass
        assert allowed == {"free-co": 2, "gold-co": 5}
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_redis_down_fails_open_to_a_local_limiter(tmp_path: Any) -> None:
    private = RedisProcess(tmp_path)
    private.start()
    client = aioredis.Redis.from_url(private.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    fallbacks: list[int] = []
    limiter = RateLimiter(
        client,
        RateLimitSettings(session_messages_per_minute=3),
        on_fallback=lambda: fallbacks.append(1),
    )
    try:
        await limiter.admit_message("default", "s1", 10)
        private.stop()
        admitted, refused = [], []
        for _ in range(6):
            try:
                admitted.append(await limiter.admit_message("default", "s1", 10))
            except RateLimitedError as error:
                refused.append(error.limit)
        assert len(admitted) == 3  # the local limiter enforces the same limit
        assert all(a.local for a in admitted)
        assert refused == ["session_messages"] * 3
        assert len(fallbacks) == 6
        closed = RateLimiter(client, RateLimitSettings(redis_down="closed"))
        with pytest.raises(StoreUnavailableError):
            await closed.admit_call("default")
    finally:
        private.stop()
        await client.aclose()


@pytest.mark.slow
async def test_redis_down_during_a_stream_counts_the_fallback_metric(
    tmp_path: Any, sim: UpstreamSim
) -> None:
    private = RedisProcess(tmp_path)
    private.start()
    app = await KoreroServer.start(make_settings(private.url, sim.base_url))
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            private.stop()
            events = await run_turn(conversation, "anyone?", "d1")
            # The limiter failed open; the store then says Redis is unavailable.
            assert events[-1].error.reason == "STORE_UNAVAILABLE"
        fallbacks = app.metrics.registry.get_sample_value("korero_rate_limit_fallbacks_total")
        assert fallbacks is not None
        assert fallbacks >= 1
    finally:
        private.stop()
        await app.shutdown(grace=0)


@pytest.mark.slow
async def test_two_server_processes_admit_exactly_the_limit(
    redis_url: str, sim: UpstreamSim
) -> None:
    limit = 20
    env = {
        "REDIS_URL": redis_url,
        "KORERO_LLM_BASE_URL": sim.base_url,
        "KORERO_TENANT_REQUESTS_PER_MINUTE": str(limit),
        "KORERO_RATE_WINDOW_SECONDS": "3600",  # refill is negligible during the test
        "KORERO_METRICS_LISTEN": "127.0.0.1:0",
        "KORERO_LOG_LEVEL": "INFO",
    }
    servers = [await start_server_process(env) for _ in range(2)]
    try:
        outcomes: Counter[str] = Counter()

        async def caller(target: str, n: int) -> None:
            async with ChatClient(target) as client:
                for _ in range(n):
                    try:
                        await client.get_session("no-such-session")
                    except ChatError as error:
                        outcomes[error.code.name] += 1

        await asyncio.gather(
            *(caller(servers[i % 2].target, 3) for i in range(20))  # 60 calls, 20 callers
        )
        assert outcomes["NOT_FOUND"] == limit  # admitted (then not found)
        assert outcomes["RESOURCE_EXHAUSTED"] == 60 - limit
    finally:
        for server in servers:
            server.proc.terminate()
            await server.proc.wait()
    assert os.environ.get("REDIS_URL") != redis_url  # the test did not leak its env


def test_free_port_helper_is_usable() -> None:
    assert 0 < free_port() < 65536

"""The Redis layer: round trips per turn, key layout, error translation, outages."""

from __future__ import annotations

import asyncio
import inspect
import random
from typing import Any, ClassVar

import grpc
import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.connection import Connection

from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.server.errors import StoreUnavailableError
from korero.server.settings import EngineSettings, Settings
from korero.server.storage.boundary import REDIS_ERROR_MAP, translate_redis_error
from korero.server.storage.sessions import SessionStore
from korero.sim import UpstreamSim
from korero.testing import free_port
from tests.conftest import RedisProcess, make_settings
from tests.helpers import DelayingProxy, kinds, run_turn


class CountingConnection(Connection):
    """Counts writes to the socket: one per round trip (a pipeline is one write)."""

    sends: ClassVar[int] = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


@pytest.mark.standalone_redis  # counts or delays one server's socket
@pytest.mark.parametrize(
    ("limits", "round_trips", "scripts"),
    [
        # admission check | begin turn + KB version + cache lookup | finish turn + cache
        # store (here: releasing the single-flight lock, nothing grounded was answered)
        # + token settlement
        (True, 3, 7),
        # begin turn + KB version + cache lookup | finish turn + cache store
        (False, 2, 5),
    ],
)
async def test_round_trips_per_turn(
    redis_proc: RedisProcess,
    redis_url: str,
    sim: UpstreamSim,
    limits: bool,
    round_trips: int,
    scripts: int,
) -> None:
    settings = make_settings(redis_url, sim.base_url, limits__enabled=limits)
    pool = aioredis.BlockingConnectionPool(
        port=redis_proc.port, connection_class=CountingConnection, max_connections=8
    )
    store = SessionStore(aioredis.Redis(connection_pool=pool), settings.engine)
    app = await KoreroServer.start(settings, store=store)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            await run_turn(conversation, "warm-up (loads the Lua scripts)", "w")
            sync = redis_proc.client()
            evalsha_before = sync.info("commandstats")["cmdstat_evalsha"]["calls"]
            before = CountingConnection.sends
            events = await run_turn(conversation, "What can I bring on board?", "m")
            assert kinds(events)[-1] == "done"
            assert CountingConnection.sends - before == round_trips
            evalsha = sync.info("commandstats")["cmdstat_evalsha"]["calls"] - evalsha_before
            assert evalsha == scripts
    finally:
        await app.shutdown(grace=0)


async def test_every_key_is_under_the_tenant_and_session_hash_tag(
    redis_proc: RedisProcess, client: ChatClient
) -> None:
    conversation = await client.conversation()
    await run_turn(conversation, "hello", "k1")
    keys = sorted(k.decode() for k in redis_proc.client().keys("*"))
    sid = conversation.session_id
    assert keys == sorted(
        [
            f"kr:{{default:{sid}}}:events",
            f"kr:{{default:{sid}}}:history",
            f"kr:{{default:{sid}}}:meta",
            f"kr:{{default:{sid}}}:turns",
            # rate-limit buckets share the tenant's hash tag (one slot per tenant)
            "kr:{default}:rl:requests",
            "kr:{default}:rl:tokens",
            f"kr:{{default}}:rl:session:{sid}",
        ]
    )
    for key in keys:
        assert redis_proc.client().pttl(key) > 0  # nothing is kept forever


async def test_history_is_bounded(redis_url: str, sim: UpstreamSim) -> None:
    settings = make_settings(
        redis_url, sim.base_url, engine__history_max_messages=4, engine__prompt_history_messages=3
    )
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            for i in range(4):
                await run_turn(conversation, f"q{i}", f"h{i}")
            history = await client.list_messages(conversation.session_id)
            assert [m.text for m in history.messages][::2] == ["q2", "q3"]
            # the prompt holds the system message plus the last 3 messages
            assert len(sim.requests[-1].body["messages"]) == 4
    finally:
        await app.shutdown(grace=0)


def _redis_exception_classes() -> list[type[BaseException]]:
    return [
        obj
        for _, obj in inspect.getmembers(rexc, inspect.isclass)
        if issubclass(obj, rexc.RedisError | rexc.RedisClusterException)
    ]


@pytest.mark.parametrize("cls", _redis_exception_classes(), ids=lambda c: c.__name__)
def test_every_redis_exception_is_translated(cls: type[BaseException]) -> None:
    try:
        exc = cls("boom")
    except ValueError:  # cluster redirections parse "SLOT HOST:PORT"
        exc = cls("1 127.0.0.1:7000")
    error = translate_redis_error(exc)
    assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert error.reason in ("STORE_UNAVAILABLE", "STORE_ERROR")
    # Each class is named by a row of the one table (no fall-through default).
    assert any(issubclass(cls, row) for row, _ in REDIS_ERROR_MAP)
    transient = (
        rexc.ConnectionError,
        rexc.TimeoutError,
        rexc.BusyLoadingError,
        rexc.ReadOnlyError,
        rexc.OutOfMemoryError,
        rexc.ClusterError,
        rexc.TryAgainError,
        rexc.AskError,
        rexc.SlotNotCoveredError,
    )
    if issubclass(cls, transient):
        assert isinstance(error, StoreUnavailableError)
        assert error.retryable
    else:
        assert error.reason == "STORE_ERROR"
        assert not error.retryable


@pytest.mark.slow
async def test_redis_down_gives_unavailable_not_a_hang(tmp_path: Any, sim: UpstreamSim) -> None:
    private = RedisProcess(tmp_path)
    private.start()
    settings: Settings = make_settings(private.url, sim.base_url)
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            assert kinds(await run_turn(conversation, "before the outage", "r1"))[-1] == "done"
            private.stop()
            events = await run_turn(conversation, "during the outage", "r2")
            assert events[-1].error.reason == "STORE_UNAVAILABLE"
            assert events[-1].error.retryable
            with pytest.raises(ChatError) as info:
                await client.conversation()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert info.value.reason == "STORE_UNAVAILABLE"
            assert info.value.retry_after is not None
            # Redis comes back empty (no persistence): the old session is gone,
            # which the stream says plainly, and a new session works.
            private.start()
            events = await run_turn(conversation, "after the outage", "r3")
            assert events[-1].error.reason == "SESSION_NOT_FOUND"
            fresh = await client.conversation()
            assert kinds(await run_turn(fresh, "after the outage", "r4"))[-1] == "done"
    finally:
        private.stop()
        await app.shutdown(grace=0)


async def test_unreachable_redis_at_startup_still_serves_health(sim: UpstreamSim) -> None:
    settings = make_settings(f"redis://127.0.0.1:{free_port()}/0", sim.base_url)
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            with pytest.raises(ChatError) as info:
                await client.conversation()
            assert info.value.reason == "STORE_UNAVAILABLE"
    finally:
        await app.shutdown(grace=0)


def test_engine_settings_defaults_bound_history() -> None:
    assert EngineSettings().prompt_history_messages <= EngineSettings().history_max_messages


@pytest.mark.standalone_redis  # counts or delays one server's socket
async def test_cancelled_calls_never_hand_a_stale_reply_to_the_next_caller(
    redis_proc: RedisProcess, redis_url: str
) -> None:
    # The 2023 incident: a request cancelled between send and reply left its
    # reply on the connection, and the next user of that connection read it.
    proxy = DelayingProxy(redis_proc.port)
    await proxy.start()
    pool = aioredis.BlockingConnectionPool(port=proxy.port, max_connections=8, timeout=5)
    client = aioredis.Redis(connection_pool=pool)
    await client.mset({f"user:{i}": f"value-{i}" for i in range(40)})
    wrong: list[tuple[int, bytes]] = []
    ok = cancelled = 0

    async def user(i: int) -> None:
        nonlocal ok, cancelled
        for _ in range(10):
            try:
                value = await asyncio.wait_for(
                    client.get(f"user:{i}"), timeout=random.uniform(0.002, 0.1)
                )
            except TimeoutError:
                cancelled += 1
                continue
            if value != f"value-{i}".encode():
                wrong.append((i, value))
            ok += 1

    try:
        await asyncio.wait_for(asyncio.gather(*(user(i) for i in range(40))), 60)
    finally:
        await client.aclose()
        await proxy.stop()
    assert cancelled > 20  # the test did cancel calls mid-flight
    assert ok > 20
    assert wrong == []

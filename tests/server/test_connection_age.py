"""`KORERO_MAX_CONNECTION_AGE` on a real server: what docs/scaling.md promises.

A connection older than the age gets GOAWAY: the client's *new* calls open a
new connection (which a balancer could send to another instance), while the
streams already open on the old one carry on — no `max_connection_age_grace`
is set, so nothing cuts a live conversation — and the old connection closes
once its last stream ends. The client dials through a loopback TCP proxy
(`korero.testing.FlakyProxy`, no cuts) that counts the TCP connections it
accepts and how many are still open. The same steps with the age `off` are
the control: one connection throughout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.sim import SimConfig, UpstreamSim
from korero.testing import FlakyProxy
from tests.conftest import make_settings
from tests.helpers import kinds, run_turn

AGE = 0.8
"""Seconds; grpc-core jitters it by ±10 %, so GOAWAY comes 0.72-0.88 s after connecting."""


@pytest.fixture
async def slow_sim() -> AsyncIterator[UpstreamSim]:
    # 30 tokens at 20/s: a turn lasts ~1.5 s, so the first one straddles the age.
    async with UpstreamSim(SimConfig(ttft=0.02, tokens_per_second=20, answer_tokens=30)) as up:
        yield up


async def _eventually(predicate: Callable[[], bool], within: float) -> bool:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.slow  # waits out several connection ages
@pytest.mark.parametrize(("age", "connections"), [(AGE, 2), (None, 1)], ids=["age-0.8s", "age-off"])
async def test_new_calls_move_to_a_new_connection_and_open_streams_carry_on(
    redis_url: str, slow_sim: UpstreamSim, age: float | None, connections: int
) -> None:
    settings = make_settings(redis_url, slow_sim.base_url, server__max_connection_age=age)
    app = await KoreroServer.start(settings)
    try:
        async with (
            FlakyProxy([("127.0.0.1", app.port)]) as proxy,
            # No reconnect: a stream cut by the server would fail the turn, not be resumed.
            ChatClient(f"127.0.0.1:{proxy.port}", reconnect=None) as client,
        ):
            loop = asyncio.get_running_loop()
            opened = loop.time()
            long = await client.conversation()
            assert proxy.connections == 1

            # A turn that is still streaming when the connection reaches its age.
            first = await run_turn(long, "first question")
            assert kinds(first)[-1] == "done"
            assert loop.time() - opened > AGE * 1.1 + 0.2

            # A new call after the age: on a new connection with the age set; the old
            # one stays open (the long stream still lives on it).
            session = await client.get_session(long.session_id)
            assert session.session_id == long.session_id
            assert proxy.connections == connections
            assert proxy.open_connections == connections

            # The long stream is used again past three ages: never cut.
            await asyncio.sleep(max(0.0, opened + 3 * AGE - loop.time()))
            second = await run_turn(long, "second question")
            assert kinds(second)[-1] == "done"
            assert long.reconnects == 0

            # Its last stream ended, a connection past its age closes; without an age
            # the client keeps its one connection.
            await long.close()
            if age is not None:
                assert await _eventually(lambda: proxy.open_connections == 0, within=3 * AGE)
            else:
                await asyncio.sleep(3 * AGE)
                assert proxy.open_connections == 1
            assert proxy.connections == connections
    finally:
        await app.shutdown(grace=0.5)

"""The tool result cache: a non-personal tool's result reused across sessions, over
real HTTP (the server, the simulated upstream, the sample airline service) with
the cache in a private Redis."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from korero.airline import AirlineFault, AirlineService
from korero.chat.v1 import chat_pb2 as pb
from korero.server.app import KoreroServer
from korero.server.settings import RedisSettings
from korero.server.storage.connection import connect
from korero.server.tools import ToolCall, ToolExecutor, ToolResultCache, ToolSpec
from korero.sim import UpstreamSim
from tests.conftest import make_settings
from tests.helpers import of_kind, redis_client, terminals, text_of
from tests.server.test_tools_loop import FLIGHT_LABEL, add_tools, ask, finished, sample_tools

FLIGHT_QUESTION = "What is the status of flight NZ101?"
BOOKING_QUESTION = "What baggage does my booking include?"


@pytest.fixture
async def airline() -> AsyncIterator[AirlineService]:
    async with AirlineService() as service:
        yield service


def specs_by_name(base: str) -> dict[str, ToolSpec]:
    return {s.name: s for s in sample_tools(base)}


async def start(redis_url: str, sim: UpstreamSim, **overrides: Any) -> KoreroServer:
    return await KoreroServer.start(make_settings(redis_url, sim.base_url, **overrides))


async def test_two_sessions_asking_about_one_flight_make_one_request(
    redis_url: str, sim: UpstreamSim, airline: AirlineService
) -> None:
    await add_tools(redis_url, "default", sample_tools(airline.base_url))
    server = await start(redis_url, sim)  # the default TTL: 60 s
    try:
        first = await ask(server, FLIGHT_QUESTION, booking="KR7Q2X", name="Aroha")
        second = await ask(server, FLIGHT_QUESTION, booking="B4T9LM", name="Tama")
        bookings = [await ask(server, BOOKING_QUESTION) for _ in range(2)]
    finally:
        await server.shutdown(grace=0)

    # The airline service saw one flight request; the personal tool ran every time.
    assert airline.requests == ["/v1/flights/NZ101"] + ["/v1/bookings/KR7Q2X"] * 2
    for events in (first, second):
        [result] = finished(events)
        assert result.status == pb.TOOL_CALL_STATUS_OK
        assert result.source == FLIGHT_LABEL  # the data's own time, kept by the cache
        text = text_of(events)
        assert "**delayed** by 45 minutes" in text
        assert f"[Source: {FLIGHT_LABEL}]" in text
        [citation] = [e.citation for e in of_kind(events, "citation")]
        assert citation.document_id == "tool:get_flight_status"
        assert len(terminals(events)) == 1
        assert events[-1].done.finish_reason == pb.FINISH_REASON_STOP
    assert text_of(first) == text_of(second)
    # The customer sees the second result came from the cache, not from a call.
    assert [finished(e)[0].cached for e in (first, second)] == [False, True]
    assert finished(second)[0].duration.ToNanoseconds() < 0.5e9
    for events in bookings:
        assert finished(events)[0].status == pb.TOOL_CALL_STATUS_OK
        assert not finished(events)[0].cached
        assert "Your booking KR7Q2X for Aroha Ngata" in text_of(events)

    specs = specs_by_name(airline.base_url)
    flight_key = ToolResultCache.key(
        "default", specs["get_flight_status"], {"flight_number": "NZ101"}
    )
    booking_key = ToolResultCache.key("default", specs["get_my_booking"], {"reference": "KR7Q2X"})
    assert flight_key.startswith("kr:{default:tools}:result:get_flight_status:")
    client = redis_client(redis_url)
    try:
        assert 50_000 < await client.pttl(flight_key) <= 60_000
        assert await client.exists(booking_key) == 0
    finally:
        await client.aclose()


async def test_a_ttl_of_zero_turns_the_cache_off(
    redis_url: str, sim: UpstreamSim, airline: AirlineService
) -> None:
    await add_tools(redis_url, "default", sample_tools(airline.base_url))
    server = await start(redis_url, sim, tools__result_cache_seconds=0.0)
    try:
        answers = [await ask(server, FLIGHT_QUESTION) for _ in range(2)]
    finally:
        await server.shutdown(grace=0)
    assert airline.requests == ["/v1/flights/NZ101"] * 2
    assert [finished(e)[0].cached for e in answers] == [False, False]
    assert all(f"[Source: {FLIGHT_LABEL}]" in text_of(e) for e in answers)
    spec = specs_by_name(airline.base_url)["get_flight_status"]
    client = redis_client(redis_url)
    try:
        key = ToolResultCache.key("default", spec, {"flight_number": "NZ101"})
        assert await client.exists(key) == 0
    finally:
        await client.aclose()


async def test_failed_calls_are_not_cached_and_the_entry_expires(
    redis_url: str, sim: UpstreamSim, airline: AirlineService
) -> None:
    specs = sample_tools(airline.base_url, get_flight_status={"timeout": 0.3})
    await add_tools(redis_url, "default", specs)
    server = await start(redis_url, sim, tools__result_cache_seconds=0.4)
    try:
        airline.inject(AirlineFault("error", status=500))
        broken = await ask(server, FLIGHT_QUESTION)
        airline.inject(AirlineFault("delay", seconds=3))
        slow = await ask(server, FLIGHT_QUESTION)
        fetched = await ask(server, FLIGHT_QUESTION)
        reused = await ask(server, FLIGHT_QUESTION)
        # The tool is called again once the entry has expired.
        key = ToolResultCache.key("default", specs[0], {"flight_number": "NZ101"})
        client = redis_client(redis_url)
        try:
            for _ in range(100):
                if not await client.exists(key):
                    break
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()
        refetched = await ask(server, FLIGHT_QUESTION)
    finally:
        await server.shutdown(grace=0)
    statuses = [finished(e)[0].status for e in (broken, slow, fetched, reused, refetched)]
    assert statuses == [
        pb.TOOL_CALL_STATUS_FAILED,
        pb.TOOL_CALL_STATUS_TIMEOUT,
        pb.TOOL_CALL_STATUS_OK,
        pb.TOOL_CALL_STATUS_OK,
        pb.TOOL_CALL_STATUS_OK,
    ]
    cached = [finished(e)[0].cached for e in (broken, slow, fetched, reused, refetched)]
    assert cached == [False, False, False, True, False]
    assert len(airline.requests) == 4  # 500, timeout, fetched, refetched
    assert "HTTP 500" in text_of(broken)
    assert f"[Source: {FLIGHT_LABEL}]" in text_of(reused)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_failing_redis_makes_the_cache_miss_not_the_call(
    airline: AirlineService,
) -> None:
    # Nothing listens on the port: every lookup and write fails at the socket.
    broken = connect(RedisSettings(url=f"redis://127.0.0.1:{_dead_port()}/0", timeout=0.2))
    executor = ToolExecutor(result_cache=ToolResultCache(broken, 60))
    spec = specs_by_name(airline.base_url)["get_flight_status"]
    call = ToolCall("c1", "get_flight_status", '{"flight_number": "NZ101"}')
    try:
        results = [
            await executor.run(
                spec, call, intent="booking_lookup", session_facts={}, tenant="default"
            )
            for _ in range(2)
        ]
    finally:
        await executor.close()
        await broken.aclose()
    assert [(r.status, r.cached) for r in results] == [("ok", False)] * 2
    assert all(r.source == f"[Source: {FLIGHT_LABEL}]" for r in results)
    assert airline.requests == ["/v1/flights/NZ101"] * 2


async def test_cache_keys_follow_tenant_tool_config_and_arguments(redis_url: str) -> None:
    spec = specs_by_name("http://127.0.0.1:9")["get_flight_status"]
    args = {"flight_number": "NZ101"}
    key = ToolResultCache.key("acme", spec, args)
    assert key.startswith("kr:{acme:tools}:result:get_flight_status:")
    # Argument order does not matter; tenant, arguments and configuration do.
    assert ToolResultCache.key("acme", spec, dict(reversed(list(args.items())))) == key
    assert ToolResultCache.key("globex", spec, args) != key
    assert ToolResultCache.key("acme", spec, {"flight_number": "NZ102"}) != key
    moved = ToolSpec.from_dict({**spec.to_dict(), "endpoint": "http://127.0.0.2:9/{flight_number}"})
    assert ToolResultCache.key("acme", moved, args) != key

    client = redis_client(redis_url)
    try:
        cache = ToolResultCache(client, 60)
        await cache.put("acme", spec, args, {"status": "on_time"}, "Flight status service, NZ101")
        hit = await cache.get("acme", spec, args)
        assert hit is not None
        assert hit.data == {"status": "on_time"}
        assert await cache.get("globex", spec, args) is None
        personal = ToolSpec.from_dict({**spec.to_dict(), "personal": True})
        await cache.put("acme", personal, args, {"x": 1}, "s")
        assert await cache.get("acme", personal, args) is None
        assert await client.exists(ToolResultCache.key("acme", personal, args)) == 0
    finally:
        await client.aclose()

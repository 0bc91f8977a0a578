"""The stored history records an answer's tool calls: in Redis, in PostgreSQL, and
in ListMessages — name, status, duration, data source, cached; never arguments."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from korero.airline import AirlineService
from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.sim import UpstreamSim
from tests.conftest import make_settings
from tests.helpers import run_turn, text_of
from tests.pg import drop_database, fresh_database
from tests.server.test_tools_loop import FLIGHT_LABEL, add_tools, sample_tools


@pytest.fixture
async def airline() -> AsyncIterator[AirlineService]:
    async with AirlineService() as service:
        yield service


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url = await fresh_database()
    yield url
    await drop_database(url)


def calls_of(message: pb.Message) -> list[tuple[str, int, str, bool]]:
    return [(c.name, c.status, c.source, c.cached) for c in message.tool_calls]


async def test_list_messages_shows_each_answers_tool_calls_from_redis_and_postgres(
    redis_url: str, sim: UpstreamSim, airline: AirlineService, pg_url: str
) -> None:
    await add_tools(redis_url, "default", sample_tools(airline.base_url))
    settings = make_settings(
        redis_url,
        sim.base_url,
        postgres__url=pg_url,
        postgres__drain_interval=0.05,
        postgres__commit_wait=10.0,
        # Redis keeps the last two messages: the older ones are read from PostgreSQL.
        engine__history_max_messages=2,
    )
    server = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{server.port}") as client:
            meta = pb.SessionMetadata(customer_name="Aroha", booking_reference="KR7Q2X")
            conversation = await client.conversation(metadata=meta)
            flight = await run_turn(conversation, "What is the status of flight NZ101?", "m1")
            booking = await run_turn(conversation, "What baggage does my booking include?", "m2")
            again = await run_turn(conversation, "And flight NZ101 again?", "m3")
            page = await client.list_messages(conversation.session_id, 20)
    finally:
        await server.shutdown(grace=0.5)
    assert all(
        events[-1].done.finish_reason == pb.FINISH_REASON_STOP
        for events in (flight, booking, again)
    )

    answers = [m for m in page.messages if m.role == pb.ROLE_ASSISTANT]
    assert [m.text for m in answers] == [text_of(e) for e in (flight, booking, again)]
    ok = pb.TOOL_CALL_STATUS_OK
    # The first two answers come from PostgreSQL, the last from Redis.
    assert calls_of(answers[0]) == [("get_flight_status", ok, FLIGHT_LABEL, False)]
    [booked] = calls_of(answers[1])
    assert booked[:2] == ("get_my_booking", ok)
    assert booked[2].startswith("Booking service, KR7Q2X, ")
    assert calls_of(answers[2]) == [("get_flight_status", ok, FLIGHT_LABEL, True)]  # cached
    for message in answers[:2]:
        assert 0 < message.tool_calls[0].duration.ToNanoseconds() < 2e9
    for message in page.messages:
        if message.role == pb.ROLE_USER:
            assert not message.tool_calls

    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT turn_id, tool_calls FROM messages"
            " WHERE session_id = $1 AND role = 'assistant' ORDER BY turn_no",
            conversation.session_id,
        )
    finally:
        await conn.close()
    stored = {r["turn_id"]: json.loads(r["tool_calls"]) for r in rows}
    assert [c["name"] for c in stored["t1"]] == ["get_flight_status"]
    assert [c["name"] for c in stored["t3"]] == ["get_flight_status"]
    assert stored["t3"][0]["cached"] is True
    # The personal call's record keeps no arguments: the booking reference is not in it.
    [personal] = stored["t2"]
    assert set(personal) == {"name", "status", "duration_ms", "source", "cached"}
    assert personal["status"] == "ok"
    assert "KR7Q2X" not in json.dumps({k: v for k, v in personal.items() if k != "source"})

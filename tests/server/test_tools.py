"""Tool specs, the per-tenant registry in Redis, the executor over real HTTP, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from korero.airline import AirlineFault, AirlineService
from korero.server.cli.tools import load_tool_file
from korero.server.tools import (
    DATA_NOTICE,
    ToolCall,
    ToolExecutor,
    ToolRegistry,
    ToolSpec,
    ToolSpecError,
    tools_key,
)
from tests.helpers import redis_client

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tools" / "sample.json"
KORERO = str(Path(sys.executable).parent / "korero")


def sample_specs(base: str) -> dict[str, ToolSpec]:
    return {s.name: s for s in load_tool_file(SAMPLE.read_text(), base)}


@pytest.fixture
async def airline() -> AsyncIterator[AirlineService]:
    async with AirlineService() as service:
        yield service


@pytest.fixture
async def executor() -> AsyncIterator[ToolExecutor]:
    ex = ToolExecutor()
    yield ex
    await ex.close()


# -- specs ----------------------------------------------------------------------


def test_sample_tools_parse_and_hide_session_arguments_from_the_model() -> None:
    specs = sample_specs("")
    booking = specs["get_my_booking"]
    assert booking.personal
    assert booking.session_arguments == {"reference": "booking_reference"}
    fn = booking.to_openai()["function"]
    assert fn["name"] == "get_my_booking"
    assert "reference" not in fn["parameters"]["properties"]
    assert "required" not in fn["parameters"]
    flight = specs["get_flight_status"].to_openai()["function"]
    assert flight["parameters"]["required"] == ["flight_number"]
    assert ToolSpec.from_dict(specs["get_flight_status"].to_dict()) == specs["get_flight_status"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "has space"}, "'name'"),
        ({"parameters": {"type": "string"}}, "type object"),
        ({"parameters": {"type": "object", "properties": {"a": {"type": 5}}}}, "JSON Schema"),
        ({"endpoint": "ftp://x/{flight_number}"}, "http(s)"),
        ({"endpoint": "http://x/{nope}"}, "placeholder"),
        ({"timeout": 0}, "timeout"),
        ({"intents": ["weather"]}, "intents"),
        ({"session_arguments": {"flight_number": "booking_reference"}}, "must be personal"),
        ({"session_arguments": {"flight_number": "passport"}, "personal": True}, "session_arg"),
        ({"colour": "red"}, "unknown tool fields"),
    ],
)
def test_unusable_specs_are_refused_with_a_reason(change: dict[str, Any], message: str) -> None:
    base = sample_specs("")["get_flight_status"].to_dict()
    with pytest.raises(ToolSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ToolSpec.from_dict({**base, **change})


# -- registry -------------------------------------------------------------------


async def test_registry_is_per_tenant_under_a_hash_tagged_key(redis_url: str) -> None:
    client = redis_client(redis_url)
    try:
        registry = ToolRegistry(client)
        specs = sample_specs("http://127.0.0.1:1")
        assert await registry.put("t1", specs["get_flight_status"]) is True
        assert await registry.put("t1", specs["get_flight_status"]) is False
        await registry.put("t1", specs["get_my_booking"])
        assert [s.name for s in await registry.list("t1")] == [
            "get_flight_status",
            "get_my_booking",
        ]
        assert await registry.list("t2") == []
        assert tools_key("t1") == "kr:{t1:tools}"
        assert await client.exists("kr:{t1:tools}") == 1
        assert await registry.remove("t1", "get_my_booking") is True
        assert await registry.remove("t1", "get_my_booking") is False
        assert [s.name for s in await registry.list("t1")] == ["get_flight_status"]
    finally:
        await client.aclose()


# -- executor -------------------------------------------------------------------


async def test_flight_status_call_returns_data_and_a_source_label(
    airline: AirlineService, executor: ToolExecutor
) -> None:
    spec = sample_specs(airline.base_url)["get_flight_status"]
    result = await executor.run(
        spec,
        ToolCall("c1", spec.name, '{"flight_number": "NZ101"}'),
        intent="booking_lookup",
        session_facts={},
    )
    assert result.status == "ok"
    assert result.data["gate"] == "8"
    assert result.source == "[Source: Flight status service, NZ101, 2026-11-30 14:05]"
    text = result.for_model()
    assert text.startswith(DATA_NOTICE + "\n")
    assert json.loads(text.split("\n", 1)[1])["data"]["delay_minutes"] == 45


async def test_personal_tool_takes_the_reference_from_the_session_not_the_model(
    airline: AirlineService, executor: ToolExecutor
) -> None:
    spec = sample_specs(airline.base_url)["get_my_booking"]
    call = ToolCall("c1", spec.name, '{"reference": "B4T9LM"}')  # someone else's booking
    result = await executor.run(
        spec, call, intent="booking_lookup", session_facts={"booking_reference": "KR7Q2X"}
    )
    assert result.status == "ok"
    assert result.data["passenger_name"] == "Aroha Ngata"
    assert airline.requests == ["/v1/bookings/KR7Q2X"]
    assert result.personal

    missing = await executor.run(spec, call, intent="booking_lookup", session_facts={})
    assert missing.status == "missing_session_fact"
    assert "booking reference" in missing.error
    assert airline.requests == ["/v1/bookings/KR7Q2X"]


async def test_refusals_never_reach_the_service(
    airline: AirlineService, executor: ToolExecutor
) -> None:
    spec = sample_specs(airline.base_url)["get_flight_status"]
    cases = [
        (spec, '{"flight_number": "NZ101"}', "small_talk", "not_allowed"),
        (spec, '{"flight_number": "not a flight"}', "booking_lookup", "invalid_arguments"),
        (spec, '{"flight_number": "NZ1", "x": 1}', "booking_lookup", "invalid_arguments"),
        (spec, "[1, 2]", "booking_lookup", "invalid_arguments"),
        (spec, "{oops", "booking_lookup", "invalid_arguments"),
        (None, "{}", "booking_lookup", "unknown_tool"),
    ]
    for tool, arguments, intent, status in cases:
        result = await executor.run(
            tool, ToolCall("c", "get_flight_status", arguments), intent=intent, session_facts={}
        )
        assert result.status == status, (arguments, intent)
        assert result.error
        assert result.source == ""
    assert airline.requests == []


async def test_failures_become_results_the_model_can_explain(
    airline: AirlineService, executor: ToolExecutor
) -> None:
    spec = sample_specs(airline.base_url)["get_flight_status"]
    call = ToolCall("c", spec.name, '{"flight_number": "NZ101"}')

    airline.inject(AirlineFault("error", status=500))
    failed = await executor.run(spec, call, intent="booking_lookup", session_facts={})
    assert failed.status == "error"
    assert "HTTP 500" in failed.error

    airline.inject(AirlineFault("delay", seconds=5))
    slow = await executor.run(spec, call, intent="booking_lookup", session_facts={}, time_left=0.3)
    assert slow.status == "timeout"
    assert 0.25 < slow.duration < 1.5
    assert "did not answer within 0.3 seconds" in slow.error

    unknown = await executor.run(
        spec,
        ToolCall("c", spec.name, '{"flight_number": "NZ999"}'),
        intent="booking_lookup",
        session_facts={},
    )
    assert unknown.status == "not_found"

    tiny = ToolSpec.from_dict({**spec.to_dict(), "max_result_bytes": 100})
    big = await executor.run(tiny, call, intent="booking_lookup", session_facts={})
    assert big.status == "too_large"

    gone = ToolSpec.from_dict({**spec.to_dict(), "endpoint": "http://127.0.0.1:1/{flight_number}"})
    down = await executor.run(gone, call, intent="booking_lookup", session_facts={})
    assert down.status == "unavailable"


async def test_cancelling_a_call_cancels_the_http_request(
    airline: AirlineService, executor: ToolExecutor
) -> None:
    spec = sample_specs(airline.base_url)["get_flight_status"]
    airline.inject(AirlineFault("delay", seconds=10))
    task = asyncio.create_task(
        executor.run(
            spec,
            ToolCall("c", spec.name, '{"flight_number": "NZ101"}'),
            intent="booking_lookup",
            session_facts={},
        )
    )
    while airline.in_flight == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if airline.cancelled:
            break
        await asyncio.sleep(0.01)
    assert airline.cancelled == 1


# -- CLI ------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_adds_lists_and_removes_tools_per_tenant(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url}

    def korero(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [KORERO, "tools", *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    added = korero("add", "--tenant", "acme", "--file", str(SAMPLE))
    assert added.returncode == 0, added.stderr
    assert "added get_flight_status for tenant acme" in added.stdout
    listed = korero("list", "--tenant", "acme")
    assert "get_my_booking" in listed.stdout
    assert "yes" in listed.stdout.splitlines()[2]
    assert korero("list", "--tenant", "other").stdout.count("\n") == 1  # header only
    full = json.loads(korero("list", "--tenant", "acme", "--json").stdout)
    assert full[0]["endpoint"] == "http://127.0.0.1:8090/v1/flights/{flight_number}"
    assert korero("remove", "--tenant", "acme", "get_my_booking").returncode == 0
    assert korero("remove", "--tenant", "acme", "get_my_booking").returncode == 1
    bad = korero("add", "--tenant", "acme", "--json", '{"name": "x"}')
    assert bad.returncode == 2
    assert "description" in bad.stderr

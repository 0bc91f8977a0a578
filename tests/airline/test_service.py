"""The sample airline data service over real HTTP."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from korero.airline import BOOKINGS, FARE_BAGGAGE, FLIGHTS, AirlineFault, AirlineService

KB = Path(__file__).resolve().parents[2] / "kb" / "sample"


@pytest.fixture
async def airline() -> AsyncIterator[AirlineService]:
    async with AirlineService() as service:
        yield service


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_flight_status_has_route_schedule_gate_and_delay(
    airline: AirlineService, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{airline.base_url}/v1/flights/NZ101") as resp:
        assert resp.status == 200
        flight = await resp.json()
    assert flight["airline"] == "Aotea Air"
    assert (flight["origin"], flight["destination"]) == ("AKL", "SYD")
    assert flight["status"] == "delayed"
    assert flight["gate"] == "8"
    assert flight["delay_minutes"] == 45
    assert flight["delay_reason"] == "late arrival of the inbound aircraft"
    assert flight["scheduled_departure"] == "2026-11-30T15:30:00+13:00"
    assert flight["estimated_departure"] == "2026-11-30T16:15:00+13:00"
    assert airline.requests == ["/v1/flights/NZ101"]


async def test_lowercase_flight_number_and_unknown_flight(
    airline: AirlineService, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{airline.base_url}/v1/flights/nz421") as resp:
        assert (await resp.json())["status"] == "boarding"
    async with http.get(f"{airline.base_url}/v1/flights/NZ999") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"


async def test_booking_has_itinerary_fare_and_its_baggage_allowance(
    airline: AirlineService, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{airline.base_url}/v1/bookings/KR7Q2X") as resp:
        booking = await resp.json()
    assert booking["passenger_name"] == "Aroha Ngata"
    assert booking["fare_class"] == "Economy Standard"
    assert [s["flight_number"] for s in booking["itinerary"]] == ["NZ101", "NZ102"]
    assert booking["baggage_allowance"]["checked"] == {"bags": 1, "max_kg_each": 23}
    assert booking["baggage_allowance"]["cabin"]["max_kg"] == 7
    async with http.get(f"{airline.base_url}/v1/bookings/ZZZZZ9") as resp:
        assert resp.status == 404


def test_baggage_allowances_match_the_knowledge_base() -> None:
    policy = " ".join((KB / "baggage.md").read_text().split())
    assert "Economy Light fares include no checked baggage" in policy
    assert FARE_BAGGAGE["Economy Light"]["checked"]["bags"] == 0
    assert "Economy Standard fares include one checked bag of up to 23 kg" in policy
    assert FARE_BAGGAGE["Economy Standard"]["checked"] == {"bags": 1, "max_kg_each": 23}
    assert "Economy Flex fares include two checked bags of up to 23 kg each" in policy
    assert FARE_BAGGAGE["Economy Flex"]["checked"] == {"bags": 2, "max_kg_each": 23}
    assert "Business class fares include two checked bags of up to 32 kg each" in policy
    assert FARE_BAGGAGE["Business"]["checked"] == {"bags": 2, "max_kg_each": 32}
    assert "one cabin bag of up to 7 kg" in policy
    assert "two cabin bags with a combined weight of 14 kg" in policy
    assert FARE_BAGGAGE["Business"]["cabin"]["combined_max_kg"] == 14
    # Every booking's flights exist and its allowance is its fare's.
    for booking in BOOKINGS.values():
        assert booking["baggage_allowance"] == FARE_BAGGAGE[booking["fare_class"]]
        assert all(s["flight_number"] in FLIGHTS for s in booking["itinerary"])
    json.dumps(BOOKINGS)  # plain JSON


async def test_injected_error_and_delay(
    airline: AirlineService, http: aiohttp.ClientSession
) -> None:
    airline.inject(AirlineFault("error", status=503))
    async with http.get(f"{airline.base_url}/v1/flights/NZ101") as resp:
        assert resp.status == 503
    async with http.get(f"{airline.base_url}/v1/flights/NZ101") as resp:
        assert resp.status == 200

    airline.inject(AirlineFault("delay", seconds=5))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2), http.get(f"{airline.base_url}/v1/flights/NZ101"):
            pass
    for _ in range(50):
        if airline.cancelled:
            break
        await asyncio.sleep(0.02)
    assert airline.cancelled == 1
    assert airline.in_flight == 0


@pytest.mark.slow
async def test_airline_api_command_serves_until_sigterm(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "korero"),
        "airline-api",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("airline-api listening on http://127.0.0.1:")
        base = line.split()[-1]
        async with aiohttp.ClientSession() as http, http.get(f"{base}/v1/flights/NZ5") as resp:
            assert (await resp.json())["destination"] == "LAX"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0

"""The sample airline's operational data: Aotea Air flights and bookings.

Deterministic on purpose, so tests can assert exact answers. Aotea Air is the
fictional airline of ``kb/sample``; fare classes and their baggage allowances
follow its baggage policy (section 1.1 and 2.1 of ``kb/sample/baggage.md``).
Times are local to the departure airport, written with their UTC offset.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AS_OF", "BOOKINGS", "FARE_BAGGAGE", "FLIGHTS", "OPERATING_DATE"]

OPERATING_DATE = "2026-11-30"
"""The one day the sample service knows about."""
AS_OF = "2026-11-30T14:05:00+13:00"
"""When the sample's operational data was last updated (shown in citations)."""

_CABIN_ECONOMY = {"bags": 1, "max_kg": 7, "personal_item": True}
_CABIN_BUSINESS = {"bags": 2, "combined_max_kg": 14, "personal_item": True}

FARE_BAGGAGE: dict[str, dict[str, Any]] = {
    "Economy Light": {"cabin": _CABIN_ECONOMY, "checked": {"bags": 0, "max_kg_each": 0}},
    "Economy Standard": {"cabin": _CABIN_ECONOMY, "checked": {"bags": 1, "max_kg_each": 23}},
    "Economy Flex": {"cabin": _CABIN_ECONOMY, "checked": {"bags": 2, "max_kg_each": 23}},
    "Business": {"cabin": _CABIN_BUSINESS, "checked": {"bags": 2, "max_kg_each": 32}},
}
"""Baggage allowance per fare class, as the baggage policy states it."""


def _flight(
    number: str,
    origin: str,
    destination: str,
    departure: str,
    arrival: str,
    *,
    status: str = "on_time",
    gate: str | None = None,
    estimated_departure: str | None = None,
    delay_minutes: int = 0,
    delay_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "flight_number": number,
        "airline": "Aotea Air",
        "date": departure[:10],
        "origin": origin,
        "destination": destination,
        "scheduled_departure": departure,
        "scheduled_arrival": arrival,
        "estimated_departure": estimated_departure or departure,
        "status": status,
        "gate": gate,
        "delay_minutes": delay_minutes,
        "delay_reason": delay_reason,
        "updated_at": AS_OF,
    }


FLIGHTS: dict[str, dict[str, Any]] = {
    f["flight_number"]: f
    for f in (
        _flight(
            "NZ101",
            "AKL",
            "SYD",
            "2026-11-30T15:30:00+13:00",
            "2026-11-30T17:20:00+11:00",
            status="delayed",
            gate="8",
            estimated_departure="2026-11-30T16:15:00+13:00",
            delay_minutes=45,
            delay_reason="late arrival of the inbound aircraft",
        ),
        _flight(
            "NZ102",
            "SYD",
            "AKL",
            "2026-11-30T19:00:00+11:00",
            "2026-12-01T00:05:00+13:00",
            gate="34",
        ),
        _flight(
            "NZ421",
            "AKL",
            "WLG",
            "2026-11-30T14:40:00+13:00",
            "2026-11-30T15:50:00+13:00",
            status="boarding",
            gate="15",
        ),
        _flight(
            "NZ422",
            "WLG",
            "AKL",
            "2026-11-30T18:00:00+13:00",
            "2026-11-30T19:05:00+13:00",
            gate="4",
        ),
        _flight(
            "NZ233",
            "CHC",
            "AKL",
            "2026-11-30T16:10:00+13:00",
            "2026-11-30T17:35:00+13:00",
            status="cancelled",
            delay_reason="severe weather at Christchurch",
        ),
        _flight(
            "NZ5",
            "AKL",
            "LAX",
            "2026-11-30T19:30:00+13:00",
            "2026-11-30T11:15:00-08:00",
            gate="3",
        ),
    )
}
"""Flights operating on `OPERATING_DATE`, by flight number."""


def _segment(number: str) -> dict[str, Any]:
    flight = FLIGHTS[number]
    return {
        "flight_number": number,
        "origin": flight["origin"],
        "destination": flight["destination"],
        "scheduled_departure": flight["scheduled_departure"],
        "scheduled_arrival": flight["scheduled_arrival"],
    }


def _booking(reference: str, name: str, fare: str, *flights: str) -> dict[str, Any]:
    return {
        "reference": reference,
        "passenger_name": name,
        "fare_class": fare,
        "itinerary": [_segment(n) for n in flights],
        "baggage_allowance": FARE_BAGGAGE[fare],
        "updated_at": AS_OF,
    }


BOOKINGS: dict[str, dict[str, Any]] = {
    b["reference"]: b
    for b in (
        _booking("KR7Q2X", "Aroha Ngata", "Economy Standard", "NZ101", "NZ102"),
        _booking("B4T9LM", "Tama Walker", "Business", "NZ421", "NZ422"),
        _booking("M8J3KD", "Mere Parata", "Economy Light", "NZ233"),
        _booking("FX2P9A", "Sam Lee", "Economy Flex", "NZ5"),
    )
}
"""Bookings by reference."""

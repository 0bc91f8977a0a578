"""A sample airline data service (Aotea Air, the airline of ``kb/sample``).

Live operational data for the tools demo and tests: flights and bookings
behind a small HTTP API (`AirlineService`), started by ``korero airline-api``.
"""

from __future__ import annotations

from korero.airline._data import AS_OF, BOOKINGS, FARE_BAGGAGE, FLIGHTS, OPERATING_DATE
from korero.airline._service import AirlineFault, AirlineService

__all__ = [
    "AS_OF",
    "BOOKINGS",
    "FARE_BAGGAGE",
    "FLIGHTS",
    "OPERATING_DATE",
    "AirlineFault",
    "AirlineService",
]

"""The sample airline data service: a small HTTP API over `_data`.

Endpoints (JSON):

* ``GET /v1/flights/{flight_number}``: one flight's status, gate and delay;
* ``GET /v1/bookings/{reference}``: one booking with its itinerary, fare
  class and baggage allowance;
* ``GET /health``: ``ok``.

Unknown flights and bookings are 404 with ``{"error": {"code": "not_found", ...}}``.
`AirlineService.inject` makes the next responses slow or failing, so tests
can exercise tool timeouts and errors over real HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from korero._http_service import HTTPService
from korero.airline._data import BOOKINGS, FLIGHTS

__all__ = ["AirlineFault", "AirlineService"]

logger = logging.getLogger(__name__)

_FLIGHT_NUMBER = re.compile(r"^[A-Z]{2}\s?\d{1,4}$")
_REFERENCE = re.compile(r"^[A-Z0-9]{6}$")


@dataclass(frozen=True)
class AirlineFault:
    """What the next `count` data requests suffer: a delay before answering, or an error."""

    kind: Literal["delay", "error"]
    seconds: float = 0.0
    status: int = 500
    count: int = 1


def _not_found(what: str, key: str) -> web.Response:
    body = {"error": {"code": "not_found", "message": f"no {what} {key}"}}
    return web.json_response(body, status=404)


class AirlineService(HTTPService):
    """The airline API on a real port; `start()` binds it, `stop()` releases it."""

    def __init__(self) -> None:
        super().__init__()
        self._faults: list[list[Any]] = []
        self.requests: list[str] = []
        """Paths requested, oldest first (tests check what was asked for)."""
        self.in_flight = 0
        """Data requests being answered now."""
        self.cancelled = 0
        """Data requests whose client went away before the answer."""
        self.extra_fields: dict[str, dict[str, Any]] = {}
        """Fields added to a flight's or booking's JSON (tests put hostile text here)."""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and serve; port 0 picks a free port."""
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/flights/{number}", self._flight)
        app.router.add_get("/v1/bookings/{reference}", self._booking)
        # handler_cancellation: a tool call cancelled by Kōrero is seen here at once.
        await self._serve(app, host, port, grace=1.0)
        logger.info("airline_api.started port=%d", self.port)

    async def stop(self) -> None:
        """Stop serving."""
        await self._close()

    @property
    def base_url(self) -> str:
        """The root URL, e.g. ``http://127.0.0.1:8090``."""
        return f"http://{self._host}:{self.port}"

    def inject(self, fault: AirlineFault) -> None:
        """Make the next `fault.count` data requests slow or failing."""
        self._faults.append([fault, fault.count])

    async def _apply_fault(self) -> web.Response | None:
        if not self._faults:
            return None
        entry = self._faults[0]
        fault: AirlineFault = entry[0]
        entry[1] -= 1
        if entry[1] <= 0:
            self._faults.pop(0)
        if fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
            return None
        body = {"error": {"code": "internal", "message": "simulated failure"}}
        return web.json_response(body, status=fault.status)

    async def _answer(self, request: web.Request, lookup: Any) -> web.StreamResponse:
        self.requests.append(request.path)
        self.in_flight += 1
        try:
            failed = await self._apply_fault()
            return failed if failed is not None else lookup()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def _flight(self, request: web.Request) -> web.StreamResponse:
        number = request.match_info["number"].upper().replace(" ", "")

        def lookup() -> web.Response:
            if not _FLIGHT_NUMBER.match(number) or number not in FLIGHTS:
                return _not_found("flight", number)
            return web.json_response({**FLIGHTS[number], **self.extra_fields.get(number, {})})

        return await self._answer(request, lookup)

    async def _booking(self, request: web.Request) -> web.StreamResponse:
        reference = request.match_info["reference"].upper()

        def lookup() -> web.Response:
            if not _REFERENCE.match(reference) or reference not in BOOKINGS:
                return _not_found("booking", reference)
            return web.json_response(
                {**BOOKINGS[reference], **self.extra_fields.get(reference, {})}
            )

        return await self._answer(request, lookup)

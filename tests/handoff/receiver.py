"""A CRM-like webhook receiver for tests: verifies, dedupes, and fails on request.

It checks every request the way a real receiver should, independently of the
server's own code: the HMAC-SHA256 signature over `<timestamp>.<body>`, the
timestamp's freshness, and that `Idempotency-Key` is the event id. It
processes each event id once (a retry of a processed event is acknowledged,
not processed again), and can be told to fail attempts: `fail_first=N`
answers 500 to the first N attempts of every event; `drop_after_processing`
processes an event and then answers 500 once, as if the response was lost.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from korero.testing import free_port


@dataclass
class Receiver:
    secret: str
    fail_first: int = 0
    drop_after_processing: bool = False
    always_fail: bool = False
    port: int = field(default_factory=free_port)
    attempts: Counter[str] = field(default_factory=Counter)
    processed: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    _dropped: set[str] = field(default_factory=set)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/korero"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/korero", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _valid(self, request: web.Request, body: bytes) -> str | None:  # noqa: PLR0911
        header = request.headers.get("Korero-Signature", "")
        parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
        if parts.get("t") != request.headers.get("Korero-Timestamp"):
            return "timestamp header mismatch"
        try:
            stamp = int(parts["t"])
        except (KeyError, ValueError):
            return "no timestamp"
        if abs(time.time() - stamp) > 300:
            return "stale"
        mac = hmac.new(self.secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
        if not hmac.compare_digest(mac.hexdigest(), parts.get("v1", "")):
            return "bad signature"
        event = json.loads(body)
        if request.headers.get("Idempotency-Key") != event["id"]:
            return "idempotency key is not the event id"
        if request.headers.get("Korero-Event") != event["type"]:
            return "event header mismatch"
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        problem = self._valid(request, body)
        if problem is not None:
            self.rejected.append(problem)
            return web.Response(status=401, text=problem)
        event = json.loads(body)
        key = event["id"]
        self.attempts[key] += 1
        if self.always_fail or self.attempts[key] <= self.fail_first:
            return web.Response(status=500, text="try again")
        if key not in {e["id"] for e in self.processed}:
            self.processed.append(event)  # exactly once, whatever the retries
            if self.drop_after_processing and key not in self._dropped:
                self._dropped.add(key)
                return web.Response(status=503, text="processed, but the answer was lost")
        return web.Response(status=204)

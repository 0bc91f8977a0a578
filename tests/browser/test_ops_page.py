"""The live operations page in real Chromium, through Envoy, with the admin token.

The browser side is clients/web/tests/ops.mjs; this test starts the real
parts around it, makes the traffic the tiles must show (open streams,
answered turns, a cache hit, a rate-limit refusal, an upstream error) and
checks the endpoint refuses a wrong token.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.sim import Fault, SimConfig, UpstreamSim
from tests.browser.conftest import WEB_DIST
from tests.browser.envoy import ROOT, EnvoyProcess
from tests.browser.test_chat_page import CHROMIUM, NODE
from tests.conftest import make_settings
from tests.helpers import ingest_sample, kinds, run_turn

OPS = ROOT / "clients" / "web" / "tests" / "ops.mjs"
ARTIFACTS = ROOT / "artifacts"
TOKEN = "ops-token-for-the-test"
QUESTION = "What is the checked baggage allowance?"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("KORERO_SKIP_BROWSER") == "1", reason="KORERO_SKIP_BROWSER=1"
    ),
]


@pytest.fixture
async def ops_envoy(
    redis_url: str, sim: UpstreamSim, tmp_path: Path
) -> AsyncIterator[tuple[KoreroServer, EnvoyProcess]]:
    sim.config = SimConfig(ttft=0.03, tokens_per_second=200, answer_tokens=12)
    await ingest_sample(redis_url)
    settings = make_settings(
        redis_url,
        sim.base_url,
        server__web_root=WEB_DIST,
        observability__ops_token=TOKEN,
        limits__session_messages_per_minute=2,
        llm__max_retries=0,
    )
    app = await KoreroServer.start(settings)
    assert app.websocket is not None
    envoy = EnvoyProcess(tmp_path, app.port, app.websocket.port)
    await envoy.start()
    yield app, envoy
    await envoy.stop()
    await app.shutdown(grace=0)


async def _traffic(target: str, sim: UpstreamSim) -> ChatClient:
    """What the tiles must show; returns the client holding two streams open."""
    client = ChatClient(target)
    first, second, limited, failing = [await client.conversation() for _ in range(4)]
    assert kinds(await run_turn(first, QUESTION, "a1"))[-1] == "done"
    cached = await run_turn(second, QUESTION, "b1")  # the same question: a cache hit
    assert cached[-1].done.cached
    for n in range(3):  # the session limit is 2 a minute: the third is refused
        events = await run_turn(limited, "Hello there", f"l{n}")
    assert events[-1].error.reason == "RATE_LIMITED"
    sim.inject(Fault("server_error"))
    events = await run_turn(failing, "Hello again", "f1")
    assert events[-1].error.reason.startswith("UPSTREAM_")
    await limited.close()
    await failing.close()
    return client  # first and second stay open: two active streams


@pytest.mark.timeout(120)
async def test_ops_page_shows_live_numbers_behind_the_admin_token(
    ops_envoy: tuple[KoreroServer, EnvoyProcess], sim: UpstreamSim
) -> None:
    assert CHROMIUM is not None, "Debian chromium is missing: run `make setup`"
    assert NODE is not None, "node is missing: run `make setup`"
    assert (WEB_DIST / "ops.js").exists(), "run `make web` first"
    _, envoy = ops_envoy
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.get(f"{envoy.url}ops/stats", headers=headers) as refused:
                assert refused.status == 401
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(OPS),
        env={
            **os.environ,
            "KORERO_OPS_URL": f"{envoy.url}ops.html?every=500",
            "KORERO_OPS_TOKEN": TOKEN,
            "KORERO_ARTIFACTS": str(ARTIFACTS),
            "CHROMIUM": CHROMIUM,
        },
        cwd=OPS.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    client: ChatClient | None = None
    try:
        async with asyncio.timeout(100):
            while line := (await proc.stdout.readline()).decode():
                lines.append(line)
                if line.strip() == "READY":
                    client = await _traffic(envoy.target, sim)
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if client is not None:
            await client.close()
    text = "".join(lines)
    assert proc.returncode == 0, text
    results = json.loads(next(line[4:] for line in lines if line.startswith("OPS ")))
    assert results["refusals"] >= 1
    assert results["consoleErrors"] == []
    tiles = results["tiles"]
    assert int(tiles["active_streams"]["value"]) >= 2
    assert tiles["limits_hit"]["alert"]
    assert "session_messages" in tiles["limits_hit"]["detail"]
    assert tiles["upstream_errors"]["alert"]
    assert results["last"]["cache_hit_rate"] > 0
    assert results["updates"] >= 3
    assert (ARTIFACTS / "ops-page.png").stat().st_size > 1000

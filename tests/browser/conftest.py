"""Fixtures for the browser path: Kōrero with its WebSocket listener and page, Envoy in front."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from korero.server.app import KoreroServer
from korero.server.settings import Settings
from korero.sim import SimConfig, UpstreamSim
from tests.browser.envoy import ROOT, EnvoyProcess
from tests.conftest import make_settings

WEB_DIST = ROOT / "clients" / "web" / "dist"


@pytest.fixture
def web_settings(redis_url: str, sim: UpstreamSim) -> Settings:
    # Slow enough that an answer streams visibly (~0.6 s), fast enough for CI.
    sim.config = SimConfig(ttft=0.05, tokens_per_second=40, answer_tokens=24)
    return make_settings(redis_url, sim.base_url, server__web_root=WEB_DIST)


@pytest.fixture
async def web_server(web_settings: Settings) -> AsyncIterator[KoreroServer]:
    app = await KoreroServer.start(web_settings)
    yield app
    await app.shutdown(grace=0.5)


@pytest.fixture
async def envoy(web_server: KoreroServer, tmp_path: Path) -> AsyncIterator[EnvoyProcess]:
    assert web_server.websocket is not None
    proc = EnvoyProcess(tmp_path, web_server.port, web_server.websocket.port)
    await proc.start()
    yield proc
    await proc.stop()

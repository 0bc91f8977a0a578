"""Handoff fixtures: servers with short desk timings, and a way to start more."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from korero.server.app import KoreroServer
from korero.server.settings import HandoffSettings, Settings
from korero.sim import UpstreamSim
from tests.conftest import make_settings

FAST = HandoffSettings(sweep_interval=0.1, offer_timeout=2.0, agent_grace=1.0, default_wait=60.0)


def handoff_settings(redis_url: str, llm_url: str, **overrides: Any) -> Settings:
    overrides.setdefault("handoff", FAST)
    groups = {k: overrides.pop(k) for k in ("handoff", "webhooks", "postgres") if k in overrides}
    settings = make_settings(redis_url, llm_url, **overrides)
    return dataclasses.replace(settings, **groups)


@pytest.fixture
async def start_server(
    redis_url: str, sim: UpstreamSim
) -> AsyncIterator[Callable[..., Awaitable[KoreroServer]]]:
    started: list[KoreroServer] = []

    async def start(**overrides: Any) -> KoreroServer:
        app = await KoreroServer.start(handoff_settings(redis_url, sim.base_url, **overrides))
        started.append(app)
        return app

    yield start
    for app in started:
        await app.shutdown(grace=0.2)

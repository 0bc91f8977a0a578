"""Shared fixtures: real Redis (private, on a free port), the simulated
upstream over real HTTP, and the real server on port 0.

`KORERO_TEST_REDIS=cluster` runs the same tests against a private 3-primary
Redis Cluster instead (`redis_url` is then `redis+cluster://…`); tests marked
`standalone_redis` (they count or delay one server's socket) are skipped.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.server.settings import (
    AuthSettings,
    CacheSettings,
    EngineSettings,
    KnowledgeSettings,
    LLMSettings,
    ObservabilitySettings,
    PostgresSettings,
    PromptSettings,
    RateLimitSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    ToolSettings,
)
from korero.sim import SimConfig, UpstreamSim
from korero.testing import PrivateRedis, PrivateRedisCluster

RedisProcess = PrivateRedis
"""A private redis-server that tests may stop, pause and restart (korero.testing)."""

REDIS_CLUSTER = os.environ.get("KORERO_TEST_REDIS", "") == "cluster"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not REDIS_CLUSTER:
        return
    skip = pytest.mark.skip(reason="needs one plain redis-server (KORERO_TEST_REDIS=cluster)")
    for item in items:
        if item.get_closest_marker("standalone_redis"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    proc: RedisProcess | PrivateRedisCluster
    if REDIS_CLUSTER:
        proc = PrivateRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    else:
        proc = RedisProcess(tmp_path_factory.mktemp("redis"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_proc: RedisProcess) -> str:
    redis_proc.client().flushall()
    return redis_proc.url


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSim]:
    async with UpstreamSim(SimConfig()) as upstream:
        yield upstream


def make_settings(redis_url: str, llm_url: str, **overrides: object) -> Settings:
    """Test settings: port 0, short timeouts; overrides as 'group__field'."""
    groups: dict[str, object] = {
        "server": ServerSettings(listen="127.0.0.1:0", shutdown_grace=2.0, ws_listen="127.0.0.1:0"),
        "redis": RedisSettings(url=redis_url, timeout=1.0),
        "postgres": PostgresSettings(url=None),  # the PostgreSQL suites turn it on
        "llm": LLMSettings(
            base_url=llm_url, api_key="test", retry_backoff=0.01, first_token_timeout=5.0
        ),
        "engine": EngineSettings(coalesce_window_ms=20.0, detach_grace=0.3),
        "auth": AuthSettings(key_cache_seconds=0.0),
        "limits": RateLimitSettings(),
        "observability": ObservabilitySettings(metrics_listen="127.0.0.1:0"),
        "knowledge": KnowledgeSettings(),
        "prompt": PromptSettings(),
        "cache": CacheSettings(),
        "tools": ToolSettings(),
    }
    for key, value in overrides.items():
        group, name = key.split("__")
        groups[group] = dataclasses.replace(groups[group], **{name: value})  # type: ignore[type-var]
    return Settings(**groups)  # type: ignore[arg-type]


@pytest.fixture
def settings(redis_url: str, sim: UpstreamSim) -> Settings:
    return make_settings(redis_url, sim.base_url)


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[KoreroServer]:
    app = await KoreroServer.start(settings)
    yield app
    await app.shutdown(grace=0.5)


@pytest.fixture
async def client(server: KoreroServer) -> AsyncIterator[ChatClient]:
    async with ChatClient(f"127.0.0.1:{server.port}") as c:
        yield c

"""Crash tests with a history checker: Redis kill -9 under load, PostgreSQL kill -9 of the
postmaster and an outage. Every message acknowledged with `done` must be in PostgreSQL
exactly once, in order, in its own session and tenant.

The PostgreSQL outage lasts KORERO_TEST_PG_OUTAGE seconds (default 10; the issue's
30 s runs with KORERO_TEST_PG_OUTAGE=30): the behaviour does not change with the
length, only the backlog does.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from korero.server.app import HISTORY_HEALTH, KoreroServer
from korero.server.storage.migrate import ensure_database, migrate
from korero.sim import SimConfig, UpstreamSim
from korero.testing import free_port
from tests.conftest import RedisProcess, make_settings
from tests.history_check import ConversationLoad, check_history
from tests.pg import PostgresProcess, drop_database, fresh_database, wait_until

pytestmark = pytest.mark.slow

OUTAGE = float(os.environ.get("KORERO_TEST_PG_OUTAGE", "10"))


@pytest.fixture
async def fast_sim() -> AsyncIterator[UpstreamSim]:
    async with UpstreamSim(SimConfig(ttft=0.02, tokens_per_second=400, answer_tokens=24)) as up:
        yield up


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    proc = RedisProcess(tmp_path)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def private_pg() -> Iterator[PostgresProcess]:
    proc = PostgresProcess(free_port())
    proc.start()
    yield proc
    proc.cleanup()


def _settings(redis_url: str, sim: UpstreamSim, pg_url: str) -> object:
    return make_settings(
        redis_url,
        sim.base_url,
        postgres__url=pg_url,
        postgres__drain_interval=0.05,
        postgres__timeout=1.0,
        limits__enabled=False,
        cache__enabled=False,
    )


async def test_redis_kill9_under_load_loses_no_acknowledged_message(
    private_redis: RedisProcess, fast_sim: UpstreamSim
) -> None:
    pg_url = await fresh_database()
    app = await KoreroServer.start(_settings(private_redis.url, fast_sim, pg_url))  # type: ignore[arg-type]
    try:
        load = ConversationLoad(f"127.0.0.1:{app.port}", conversations=24, turns=6, pause=0.2)
        running = asyncio.create_task(load.run(deadline=150))
        await wait_until(lambda: _gt(len(load.result.done), 20), timeout=60)
        acked_before = len(load.result.done)
        private_redis.stop()  # kill -9, no persistence: Redis comes back empty
        await asyncio.sleep(0.5)
        private_redis.start()
        result = await running
        report = await check_history(pg_url, result)
        print(
            f"\nRedis kill -9: {report} errors={dict(result.errors)} "
            f"acked before the kill={acked_before} lost sessions={result.lost_sessions}"
        )
        if report.wrong_answer or report.missing:  # pragma: no cover - diagnostics
            import asyncpg  # noqa: PLC0415

            conn = await asyncpg.connect(pg_url)
            for cmid in report.wrong_answer + report.missing:
                rows = await conn.fetch(
                    "SELECT turn_no, role, client_message_id, text FROM messages WHERE $1 <> ''"
                    " AND session_id = $2 ORDER BY turn_no, role DESC",
                    cmid,
                    next(a.session_id for a in result.done if a.client_message_id == cmid),
                )
                got = next(a.answer for a in result.done if a.client_message_id == cmid)
                print(cmid, repr(got), [tuple(r) for r in rows if r[2] == cmid])
            await conn.close()
        assert acked_before > 0
        assert result.gave_up == 0
        assert report.acknowledged == 24 * 6
        assert report.missing == []
        assert report.duplicated == 0
        assert report.out_of_order == []
        assert report.wrong_answer == []
    finally:
        await app.shutdown(grace=0.5)
        await drop_database(pg_url)


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    return int(response.status)


async def test_postgres_kill9_and_outage_keep_chat_up_and_lose_nothing(
    private_pg: PostgresProcess, redis_url: str, fast_sim: UpstreamSim
) -> None:
    pg_url = f"{private_pg.base_url}/korero"
    await ensure_database(pg_url)
    await migrate(pg_url)
    app = await KoreroServer.start(_settings(redis_url, fast_sim, pg_url))  # type: ignore[arg-type]
    assert app.outbox is not None
    try:
        load = ConversationLoad(
            f"127.0.0.1:{app.port}", conversations=16, turns=8, pause=OUTAGE / 8
        )
        running = asyncio.create_task(load.run(deadline=OUTAGE * 4 + 90))
        await wait_until(lambda: _gt(len(load.result.done), 10), timeout=60)
        private_pg.kill9()  # the postmaster; its backends follow
        killed = time.monotonic()
        acked_at_kill = len(load.result.done)
        await wait_until(lambda: _gt(app.outbox.backlog, 0), timeout=10)  # type: ignore[union-attr]
        assert await _health(app.port, HISTORY_HEALTH) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _health(app.port, "") == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - killed)))
        acked_during = len(load.result.done) - acked_at_kill
        backlog = app.metrics.registry.get_sample_value("korero_postgres_outbox_backlog")
        private_pg.start()
        result = await running
        await wait_until(lambda: _eq(app.outbox.backlog, 0), timeout=30)  # type: ignore[union-attr]
        await wait_until(lambda: _has_all(pg_url, len(result.done)), timeout=30)
        report = await check_history(pg_url, result)
        errors = app.metrics.registry.get_sample_value(
            "korero_postgres_errors_total", {"op": "write"}
        )
        print(
            f"\nPostgreSQL kill -9 + {OUTAGE:.0f}s outage: {report} "
            f"acked during the outage={acked_during} backlog at its end={backlog} "
            f"write errors={errors} client errors={dict(result.errors)}"
        )
        assert acked_during > 0  # the chat stayed available
        assert backlog is not None
        assert backlog > 0
        assert errors is not None
        assert errors > 0
        assert result.gave_up == 0
        assert report.missing == []
        assert report.duplicated == 0
        assert report.out_of_order == []
        assert report.wrong_answer == []
        assert await _health(app.port, HISTORY_HEALTH) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.shutdown(grace=0.5)


async def _gt(value: int, floor: int) -> bool:
    return value > floor


async def _eq(value: int, want: int) -> bool:
    return value == want


async def _has_all(url: str, n: int) -> bool:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM messages WHERE role = 'user'")) >= n
    finally:
        await conn.close()


def test_private_cluster_fixture_is_reusable() -> None:
    """The private cluster starts, survives a kill -9 and starts again."""
    proc = PostgresProcess(free_port())
    try:
        proc.start()
        url = f"{proc.base_url}/postgres"

        async def ping() -> int:
            import asyncpg  # noqa: PLC0415

            conn = await asyncpg.connect(url)
            try:
                return int(await conn.fetchval("SELECT 1"))
            finally:
                await conn.close()

        assert asyncio.run(ping()) == 1
        proc.kill9()
        proc.start()
        assert asyncio.run(ping()) == 1
    finally:
        proc.cleanup()


_ = (fresh_database, drop_database)

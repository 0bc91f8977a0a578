"""`korero serve --workers N`: shared ports, metrics summed over workers, a
crashed worker restarted, and SIGTERM to the parent draining every worker."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from korero.client import ChatClient, ChatError, Conversation
from korero.server.cli.workers import available_cores
from korero.sim import SimConfig, UpstreamSim
from korero.testing import ServeProcess
from tests.helpers import kinds, run_turn

CONNECTIONS = 16
"""The kernel spreads connections, not calls: 16 put both workers to work
(all on one worker: 2 x 2^-16)."""


async def _metrics(port: int) -> dict[str, float]:
    """Sample name + sorted labels -> value, as any worker reports it."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _turns_stopped(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("korero_turns_total{outcome=stop"))


@pytest.mark.slow
async def test_workers_share_ports_sum_metrics_restart_and_drain(
    redis_url: str, sim: UpstreamSim
) -> None:
    server = await ServeProcess.start(
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        env={
            "REDIS_URL": redis_url,
            "KORERO_LLM_BASE_URL": sim.base_url,
            "KORERO_WS_LISTEN": "127.0.0.1:0",
            "KORERO_METRICS_LISTEN": "127.0.0.1:0",
            "KORERO_SHUTDOWN_GRACE": "5",
            "KORERO_RATE_LIMITS": "false",
        },
    )
    clients: list[ChatClient] = []
    try:
        (plan,) = await server.wait_for(
            r"event=supervising workers=2 address=\S+:(\d+) ws=\S+:(\d+) metrics=\S+:(\d+)"
        )
        port, ws_port, metrics_port = (int(p) for p in plan.groups())
        started = await server.wait_for(r"event=worker_started worker=(\d) pid=(\d+)", count=2)
        pids = {int(m[1]): int(m[2]) for m in started}
        await server.wait_for(r"event=workers_serving", timeout=45)
        # Every worker says it serves the same, reserved, ports.
        serving = await server.wait_for(r"worker=\d .*event=serving address=\S+:(\d+)", count=2)
        assert {int(m[1]) for m in serving} == {port}

        own = [("grpc.use_local_subchannel_pool", 1)]  # one connection per client
        # No automatic reconnect: a stream on the worker killed below must show its break.
        clients = [
            ChatClient(f"127.0.0.1:{port}", options=own, reconnect=None) for _ in range(CONNECTIONS)
        ]
        conversations: list[Conversation] = await asyncio.gather(
            *(c.conversation() for c in clients)
        )
        turns = await asyncio.gather(
            *(run_turn(c, "Hello there", f"m{i}") for i, c in enumerate(conversations))
        )
        assert all(kinds(t)[-1] == "done" for t in turns)
        # Any worker's /metrics is the sum over both.
        for _ in range(3):
            metrics = await _metrics(metrics_port)
            assert _turns_stopped(metrics) == CONNECTIONS
            assert metrics["korero_active_streams{}"] == CONNECTIONS
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{ws_port}/healthz") as health,
        ):
            assert health.status == 200

        # A worker killed outright: its streams break, the other worker's carry
        # on, and the supervisor starts a new worker 0 on the same ports.
        os.kill(pids[0], signal.SIGKILL)
        await server.wait_for(rf"event=worker_exited worker=0 pid={pids[0]} exitcode=-9")
        outcomes = await asyncio.gather(
            *(run_turn(c, "Still there?", f"n{i}") for i, c in enumerate(conversations)),
            return_exceptions=True,
        )
        broken = [o for o in outcomes if isinstance(o, ChatError)]
        alive = [o for o in outcomes if isinstance(o, list)]
        assert len(broken) + len(alive) == CONNECTIONS
        assert broken, "no connection was on the killed worker"
        assert alive, "every connection was on the killed worker"
        assert all(e.code == grpc.StatusCode.UNAVAILABLE for e in broken)
        assert all(kinds(t)[-1] == "done" for t in alive)
        (restart,) = await server.wait_for(r"event=worker_started worker=0 pid=(\d+) restarts=1")
        assert int(restart[1]) != pids[0]
        await server.wait_for(r"worker=0 .*event=serving", count=2, timeout=45)
        # The dead worker's open streams no longer count; its turns still do.
        metrics = await _metrics(metrics_port)
        assert metrics["korero_active_streams{}"] == len(alive)
        assert _turns_stopped(metrics) == CONNECTIONS + len(alive)
        async with ChatClient(f"127.0.0.1:{port}") as fresh:
            assert kinds(await run_turn(await fresh.conversation(), "New here", "f1"))[-1] == "done"

        # SIGTERM to the parent drains every worker: a turn in flight finishes.
        sim.config = SimConfig(ttft=0.1, tokens_per_second=20, answer_tokens=20)  # ~1.1 s
        survivor = conversations[outcomes.index(alive[0])]
        seen = len(sim.requests)
        in_flight = asyncio.create_task(run_turn(survivor, "One more", "last"))
        await sim.wait_for(lambda r: r.id > seen and r.tokens_sent > 0)
        server.signal(signal.SIGTERM)
        assert kinds(await asyncio.wait_for(in_flight, 10))[-1] == "done"
        assert await asyncio.wait_for(server.proc.wait(), 20) == 0
        await server.wait_for(r"event=workers_stopped exitcodes=0,0")
    finally:
        for c in clients:
            await c.close()
        await server.stop()


def test_available_cores_counts_what_this_process_may_use() -> None:
    cores = available_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))


@pytest.mark.slow
async def test_kill_9_of_the_supervisor_takes_its_workers_down(redis_url: str) -> None:
    server = await ServeProcess.start(
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        env={
            "REDIS_URL": redis_url,
            "KORERO_WS_LISTEN": "127.0.0.1:0",
            "KORERO_METRICS_LISTEN": "127.0.0.1:0",
        },
    )
    try:
        started = await server.wait_for(r"event=worker_started worker=\d pid=(\d+)", count=2)
        await server.wait_for(r"event=workers_serving", timeout=45)
        server.signal(signal.SIGKILL)
        await server.proc.wait()
        # Not left serving unsupervised: the kernel kills them with their parent.
        async with asyncio.timeout(5):
            while any(_running(int(m[1])) for m in started):
                await asyncio.sleep(0.05)
    finally:
        await server.stop()

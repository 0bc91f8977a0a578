"""The server as operators run it: SIGTERM drain, health and reflection via grpcurl."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.sim import SimConfig, UpstreamSim
from tests.helpers import kinds, run_turn

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


class ServerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.target = f"127.0.0.1:{port}"


async def start_server_process(env: dict[str, str]) -> ServerProcess:
    korero = str(Path(sys.executable).parent / "korero")
    proc = await asyncio.create_subprocess_exec(
        korero,
        "serve",
        "--listen",
        "127.0.0.1:0",
        # PostgreSQL off unless a test asks for it: these tests are about the process.
        env={"KORERO_WS_LISTEN": "127.0.0.1:0", "KORERO_POSTGRES_URL": "off", **os.environ, **env},
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(45):  # a process start: imports alone took 15 s when loaded
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "server exited before serving"
                if match := re.search(r"event=serving address=\S+:(\d+)", line):
                    return ServerProcess(proc, int(match.group(1)))
    except BaseException:  # never leave a server (and its workers) running behind a failure
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise


@pytest.fixture
async def server_proc(redis_url: str, sim: UpstreamSim) -> AsyncIterator[ServerProcess]:
    server = await start_server_process(
        {
            "REDIS_URL": redis_url,
            "KORERO_LLM_BASE_URL": sim.base_url,
            "KORERO_SHUTDOWN_GRACE": "5",
            "KORERO_LOG_LEVEL": "INFO",
            "KORERO_METRICS_LISTEN": "127.0.0.1:0",
        }
    )
    yield server
    if server.proc.returncode is None:
        server.proc.kill()
        await server.proc.wait()


async def health_status(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
        return int(response.status)


@pytest.mark.slow  # spawns `korero serve`
async def test_sigterm_drains_turns_then_ends_streams_with_unavailable(
    server_proc: ServerProcess, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(ttft=0.2, tokens_per_second=25, answer_tokens=30)  # ~1.4 s
    async with ChatClient(server_proc.target) as client:
        busy = await client.conversation()
        idle = await client.conversation()
        turn = asyncio.create_task(run_turn(busy, "A question in flight", "t1"))
        await sim.wait_for(lambda r: True)
        assert await health_status(server_proc.target) == health_pb2.HealthCheckResponse.SERVING

        server_proc.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(2):
            while await health_status(server_proc.target) != (
                health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                await asyncio.sleep(0.02)
        # New streams are refused with a retryable UNAVAILABLE.
        with pytest.raises(ChatError) as refused:
            await client.conversation()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.reason == "SERVER_SHUTTING_DOWN"
        assert refused.value.retryable
        # The idle stream ends at once; the busy one finishes its turn first.
        with pytest.raises(ChatError) as ended:
            await run_turn(idle, "too late", "i1")
        assert ended.value.code == grpc.StatusCode.UNAVAILABLE
        events = await turn
        assert kinds(events)[-1] == "done"
        assert sim.requests[0].finished_at is not None
        with pytest.raises(ChatError) as closed:
            await run_turn(busy, "after the drain", "t2")
        assert closed.value.code == grpc.StatusCode.UNAVAILABLE
    assert await asyncio.wait_for(server_proc.proc.wait(), 10) == 0


@pytest.mark.slow
async def test_turn_longer_than_the_grace_period_ends_with_an_error_event(
    redis_url: str, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(tokens_per_second=10, answer_tokens=100)  # 10 s
    server = await start_server_process(
        {
            "REDIS_URL": redis_url,
            "KORERO_LLM_BASE_URL": sim.base_url,
            "KORERO_SHUTDOWN_GRACE": "0.5",
            "KORERO_METRICS_LISTEN": "127.0.0.1:0",
        }
    )
    try:
        async with ChatClient(server.target) as client:
            conversation = await client.conversation()
            turn = asyncio.create_task(run_turn(conversation, "Long story", "l1"))
            await sim.wait_for(lambda r: r.tokens_sent > 0)
            server.proc.send_signal(signal.SIGTERM)
            events = await asyncio.wait_for(turn, 5)
            assert events[-1].error.reason == "SERVER_SHUTTING_DOWN"
            assert events[-1].error.retryable
            await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=3)
        assert await asyncio.wait_for(server.proc.wait(), 10) == 0
    finally:
        if server.proc.returncode is None:
            server.proc.kill()


async def _grpcurl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return int(proc.returncode or 0), out.decode()


@pytest.mark.slow
async def test_grpcurl_sees_health_and_reflection(server: KoreroServer) -> None:
    target = f"127.0.0.1:{server.port}"
    code, out = await _grpcurl("-plaintext", target, "list")
    assert code == 0, out
    services = out.split()
    assert "korero.chat.v1.ChatService" in services
    assert "grpc.health.v1.Health" in services
    code, out = await _grpcurl("-plaintext", target, "grpc.health.v1.Health/Check")
    assert code == 0, out
    assert '"status": "SERVING"' in out
    code, out = await _grpcurl("-plaintext", target, "describe", "korero.chat.v1.ChatService")
    assert code == 0, out
    assert "rpc Chat ( stream .korero.chat.v1.ChatRequest )" in out


@pytest.mark.slow
async def test_grpcurl_can_run_a_turn(server: KoreroServer) -> None:
    code, out = await _grpcurl(
        "-plaintext",
        "-d",
        '{"message": {"client_message_id": "g1", "text": "Hi from grpcurl"}}',
        f"127.0.0.1:{server.port}",
        "korero.chat.v1.ChatService/SendMessage",
    )
    assert code == 0, out
    assert '"sessionStarted"' in out
    assert '"textDelta"' in out
    assert '"finishReason": "FINISH_REASON_STOP"' in out

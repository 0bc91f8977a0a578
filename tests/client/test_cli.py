"""The `korero` command as a person uses it, run as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from korero.server.app import KoreroServer
from korero.sim import SimConfig, UpstreamSim
from korero.testing import free_port

KORERO = str(Path(sys.executable).parent / "korero")


async def _run(*args: str, stdin: bytes = b"", timeout: float = 20) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        KORERO,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return int(proc.returncode or 0), out.decode(), err.decode()


@pytest.mark.slow
async def test_chat_streams_answers_and_resumes(server: KoreroServer, sim: UpstreamSim) -> None:
    target = f"127.0.0.1:{server.port}"
    code, out, err = await _run(
        "chat",
        "--target",
        target,
        "--name",
        "Aroha",
        stdin=b"Where is my bag?\nAnd my refund?\n",
    )
    assert code == 0, err
    assert "session " in out
    assert " started" in out
    assert 'You asked: "Where is my bag?"' in out
    assert "Aroha" in out
    assert out.count("[stop · ") == 2  # usage and latency after each answer
    assert "first token" in out
    session_id = out.split("resume with: korero chat --session ")[1].split()[0]

    code, out, err = await _run(
        "chat", "--target", target, "--session", session_id, stdin=b"/quit\n"
    )
    assert code == 0, err
    assert f"session {session_id} resumed (4 messages)" in out


@pytest.mark.slow
async def test_chat_ctrl_c_cancels_the_answer_not_the_session(
    server: KoreroServer, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(tokens_per_second=10, answer_tokens=100)
    proc = await asyncio.create_subprocess_exec(
        KORERO,
        "chat",
        "--target",
        f"127.0.0.1:{server.port}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(b"Tell me a long story\n")
    await proc.stdin.drain()
    await sim.wait_for(lambda r: r.tokens_sent >= 2)
    proc.send_signal(signal.SIGINT)
    await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=5)
    sim.config = SimConfig()
    proc.stdin.write(b"Short one\n")
    proc.stdin.close()
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    assert "[cancelled · " in text
    assert "[stop · " in text  # the session went on after the cancel


@pytest.mark.slow
async def test_chat_reports_an_unreachable_server_plainly() -> None:
    code, _out, err = await _run("chat", "--target", f"127.0.0.1:{free_port()}")
    assert code == 1
    assert "cannot open a session" in err
    assert "Traceback" not in err


@pytest.mark.slow
async def test_health_exit_codes(server: KoreroServer) -> None:
    code, out, _ = await _run("health", "--target", f"127.0.0.1:{server.port}")
    assert code == 0
    assert "SERVING" in out
    code, _, err = await _run("health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert code == 2
    assert "UNAVAILABLE" in err


@pytest.mark.slow
async def test_serve_help_lists_every_setting() -> None:
    code, out, _ = await _run("serve", "--help")
    assert code == 0
    for name in (
        "KORERO_LISTEN",
        "REDIS_URL",
        "KORERO_LLM_BASE_URL",
        "OPENAI_API_KEY",
        "KORERO_LLM_MODEL",
        "KORERO_SHUTDOWN_GRACE",
        "KORERO_COALESCE_WINDOW_MS",
    ):
        assert name in out


@pytest.mark.slow
async def test_serve_rejects_bad_settings_without_a_traceback() -> None:
    proc = await asyncio.create_subprocess_exec(
        KORERO,
        "serve",
        env={**os.environ, "KORERO_LLM_MAX_TOKENS": "lots"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert "KORERO_LLM_MAX_TOKENS='lots' is not a valid int" in err.decode()
    assert "Traceback" not in err.decode()


@pytest.mark.slow
async def test_serve_reports_a_bad_listen_address_plainly() -> None:
    proc = await asyncio.create_subprocess_exec(
        KORERO,
        "serve",
        "--listen",
        "256.0.0.1:1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert "cannot listen" in err.decode()


@pytest.mark.slow
async def test_chat_sends_a_token(redis_url: str, sim: UpstreamSim) -> None:
    from korero.server.policy.tokens import ApiKeyStore  # noqa: PLC0415
    from tests.conftest import make_settings  # noqa: PLC0415

    app = await KoreroServer.start(make_settings(redis_url, sim.base_url, auth__mode="on"))
    try:
        key, _ = await ApiKeyStore(app.store.redis).create("acme")
        target = f"127.0.0.1:{app.port}"
        code, out, err = await _run("chat", "--target", target, "--token", key, stdin=b"hi\n")
        assert code == 0, err
        assert "[stop · " in out
        code, _, err = await _run("chat", "--target", target, stdin=b"hi\n")
        assert code == 1
        assert "UNAUTHENTICATED" in err
    finally:
        await app.shutdown(grace=0)


@pytest.mark.slow
async def test_chat_shows_the_sources_of_a_grounded_answer(
    server: KoreroServer, redis_url: str
) -> None:
    from tests.helpers import ingest_sample  # noqa: PLC0415

    await ingest_sample(redis_url)
    code, out, err = await _run(
        "chat",
        "--target",
        f"127.0.0.1:{server.port}",
        stdin=b"What's the checked baggage allowance?\n",
    )
    assert code == 0, err
    assert "[Source: " in out  # the answer cites inline
    assert "  source: Baggage Policy, section " in out  # and the citation events are listed


@pytest.mark.slow
async def test_chat_and_agent_commands_hand_a_complaint_over_and_back(
    server: KoreroServer,
) -> None:
    """`korero chat` escalates a complaint; `korero agent` accepts, replies, hands back."""
    target = f"127.0.0.1:{server.port}"
    agent = await asyncio.create_subprocess_exec(
        KORERO,
        "agent",
        "--target",
        target,
        "--name",
        "Mere",
        "--skills",
        "complaints",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    chat = await asyncio.create_subprocess_exec(
        KORERO,
        "chat",
        "--target",
        target,
        "--name",
        "Aroha",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert agent.stdin is not None
    assert agent.stdout is not None
    assert chat.stdin is not None
    assert chat.stdout is not None
    seen: dict[str, list[str]] = {"agent": [], "chat": []}

    async def read(name: str, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            seen[name].append(line.decode())

    readers = [
        asyncio.create_task(read("agent", agent.stdout)),
        asyncio.create_task(read("chat", chat.stdout)),
    ]

    async def until(name: str, text: str) -> None:
        async with asyncio.timeout(15):
            while not any(text in line for line in seen[name]):
                await asyncio.sleep(0.05)

    try:
        await until("agent", "waiting for conversations")
        chat.stdin.write(b"This is the third time my bag was lost, I am furious!!\n")
        await until("agent", "[offer ")
        await until("chat", "[queued for a person: number 1 in complaints")
        agent.stdin.write(b"/accept\n")
        await until("chat", "[Mere joined the chat]")
        agent.stdin.write(b"Kia ora Aroha, I'm Mere. Let me find your bag.\n")
        await until("chat", "Mere> Kia ora Aroha")
        chat.stdin.write(b"It is a blue suitcase\n")
        await until("agent", "> It is a blue suitcase")
        agent.stdin.write(b"/back\n")
        await until("chat", "back with our virtual assistant")
        chat.stdin.write(b"Where is my bag?\n")
        await until("chat", 'You asked: "Where is my bag?"')
    finally:
        for proc in (chat, agent):
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for reader in readers:
            reader.cancel()
    transcript = "".join(seen["chat"])
    assert "[handing over to a person: complaint" in transcript
    assert transcript.index("[Mere joined the chat]") < transcript.index("back with our virtual")
    assert "customer" in "".join(seen["agent"])


@pytest.mark.slow
async def test_chat_bot_command_leaves_the_queue_for_a_person(server: KoreroServer) -> None:
    """`/human` queues the session (no agent online); `/bot` withdraws it: the handoff
    ends abandoned and the bot answers the next message."""
    chat = await asyncio.create_subprocess_exec(
        KORERO,
        "chat",
        "--target",
        f"127.0.0.1:{server.port}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert chat.stdin is not None
    assert chat.stdout is not None
    seen: list[str] = []

    async def read(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            seen.append(line.decode())

    reader = asyncio.create_task(read(chat.stdout))

    async def until(text: str) -> None:
        async with asyncio.timeout(15):
            while not any(text in line for line in seen):
                await asyncio.sleep(0.05)

    try:
        await until("/bot leaves the queue")
        chat.stdin.write(b"/human\n")
        await until("[queued for a person: number 1")
        chat.stdin.write(b"/bot\n")
        await until("You've left the queue for a person")
        chat.stdin.write(b"Where is my bag?\n")
        await until('You asked: "Where is my bag?"')
    finally:
        chat.stdin.close()
        try:
            await asyncio.wait_for(chat.wait(), 10)
        except TimeoutError:
            chat.kill()
            await chat.wait()
        reader.cancel()
    transcript = "".join(seen)
    assert transcript.index("You've left the queue") < transcript.index("You asked:")

"""The WebSocket adapter as a browser (or any WebSocket client) sees it, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.protobuf import json_format

from korero.chat.v1 import chat_pb2 as pb
from korero.server.app import KoreroServer
from korero.server.errors import KoreroError
from korero.server.policy.gate import CallGate
from korero.server.policy.identity import Authenticator, Identity
from korero.server.settings import Settings
from korero.server.transport.chat_session import StreamRules
from korero.server.transport.websocket import (
    BEARER_PREFIX,
    CHAT_PATH,
    JSON_PROTOCOL,
    PROTO_PROTOCOL,
    WebSocketServer,
)
from korero.sim import Fault, SimConfig, UpstreamSim
from tests.helpers import kinds, text_of

Socket = aiohttp.ClientWebSocketResponse


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def ws_url(server: KoreroServer | WebSocketServer) -> str:
    ws = server.websocket if isinstance(server, KoreroServer) else server
    assert ws is not None
    return f"ws://127.0.0.1:{ws.port}{CHAT_PATH}"


async def send(ws: Socket, request: pb.ChatRequest) -> None:
    if ws.protocol == JSON_PROTOCOL:
        await ws.send_str(json_format.MessageToJson(request))
    else:
        await ws.send_bytes(request.SerializeToString())


async def receive(ws: Socket, timeout: float = 5.0) -> pb.Event:
    msg = await ws.receive(timeout=timeout)
    if msg.type == aiohttp.WSMsgType.BINARY:
        return pb.ChatResponse.FromString(msg.data).event
    if msg.type == aiohttp.WSMsgType.TEXT:
        return json_format.Parse(msg.data, pb.ChatResponse()).event
    raise AssertionError(f"expected an event, got {msg.type.name} {msg.data!r} {msg.extra!r}")


async def turn_events(ws: Socket) -> list[pb.Event]:
    events = []
    async with asyncio.timeout(10):
        while not events or events[-1].WhichOneof("kind") not in ("done", "error"):
            events.append(await receive(ws))
    return events


def start(session_id: str = "") -> pb.ChatRequest:
    return pb.ChatRequest(start=pb.StartSession(session_id=session_id))


def message(text: str, cmid: str) -> pb.ChatRequest:
    return pb.ChatRequest(message=pb.UserMessage(client_message_id=cmid, text=text))


async def closed_with(ws: Socket) -> tuple[int | None, str]:
    msg = await ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    return ws.close_code, str(msg.extra or "")


@pytest.mark.parametrize("protocol", [PROTO_PROTOCOL, JSON_PROTOCOL])
async def test_a_turn_streams_the_same_events_as_grpc(
    server: KoreroServer, sim: UpstreamSim, http: aiohttp.ClientSession, protocol: str
) -> None:
    sim.config = SimConfig(tokens_per_second=200, answer_tokens=20)
    async with http.ws_connect(ws_url(server), protocols=(protocol,)) as ws:
        assert ws.protocol == protocol
        await send(ws, start())
        started = await receive(ws)
        assert started.WhichOneof("kind") == "session_started"
        await send(ws, message("Where is my bag?", "m1"))
        events = await turn_events(ws)
    assert kinds(events)[0] == "turn_started"
    assert kinds(events)[-2:] == ["usage", "done"]
    assert kinds(events).count("text_delta") >= 2
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert seqs[0] > started.seq
    assert text_of(events).startswith('You asked: "Where is my bag?"')
    assert events[-1].done.finish_reason == pb.FINISH_REASON_STOP
    stored = await server.engine.list_messages(
        server.settings.engine.tenant, started.session_id, 10, ""
    )
    assert [m.text for m in stored.messages][-1] == text_of(events)


async def test_no_subprotocol_means_binary_framing_and_a_session_can_be_resumed(
    server: KoreroServer, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(ws_url(server)) as ws:
        assert ws.protocol is None
        await send(ws, start())
        session_id = (await receive(ws)).session_id
        await send(ws, message("hi", "m1"))
        await turn_events(ws)
    async with http.ws_connect(ws_url(server)) as ws:
        await send(ws, start(session_id))
        resumed = await receive(ws)
        assert resumed.session_started.resumed
        assert resumed.session_started.session.turn_count == 1


async def test_cancel_frame_ends_the_turn_and_the_socket_stays(
    server: KoreroServer, sim: UpstreamSim, http: aiohttp.ClientSession
) -> None:
    sim.inject(Fault("stall", after_tokens=3))
    async with http.ws_connect(ws_url(server)) as ws:
        await send(ws, start())
        await receive(ws)
        await send(ws, message("a long one", "m1"))
        assert (await receive(ws)).WhichOneof("kind") == "turn_started"
        assert (await receive(ws)).WhichOneof("kind") == "rate_limit"
        assert (await receive(ws)).WhichOneof("kind") == "text_delta"
        await send(ws, pb.ChatRequest(cancel=pb.CancelTurn()))
        events = await turn_events(ws)
        assert events[-1].done.finish_reason == pb.FINISH_REASON_CANCELLED
        upstream = await sim.wait_for(lambda r: r.disconnected_at is not None)
        assert upstream.finished_at is None
        await send(ws, message("again", "m2"))
        assert (await turn_events(ws))[-1].done.finish_reason == pb.FINISH_REASON_STOP


async def test_closing_the_socket_cancels_the_upstream_call(
    server: KoreroServer, sim: UpstreamSim, http: aiohttp.ClientSession
) -> None:
    sim.inject(Fault("stall", after_tokens=3))
    async with http.ws_connect(ws_url(server)) as ws:
        await send(ws, start())
        await receive(ws)
        await send(ws, message("a long one", "m1"))
        await receive(ws)  # turn_started
        assert (await receive(ws)).WhichOneof("kind") == "rate_limit"
        assert (await receive(ws)).WhichOneof("kind") == "text_delta"
    upstream = await sim.wait_for(lambda r: r.disconnected_at is not None)
    assert upstream.tokens_sent == 3
    async with asyncio.timeout(5):
        while server.engine.active_turns:
            await asyncio.sleep(0.02)


async def test_bad_frames_close_with_a_clear_code_and_reason(
    server: KoreroServer, http: aiohttp.ClientSession
) -> None:
    # Every one is said in-band first (an error event), then the socket closes.
    # A text frame where the framing is binary: 1003 (unsupported data).
    async with http.ws_connect(ws_url(server), protocols=(PROTO_PROTOCOL,)) as ws:
        await ws.send_str("hello")
        assert (await receive(ws)).error.reason == "FRAME_TYPE_INVALID"
        code, reason = await closed_with(ws)
    assert (code, reason) == (1003, "INVALID_ARGUMENT FRAME_TYPE_INVALID")
    # Bytes that are not a ChatRequest: 1007 (invalid payload), first frame or later.
    async with http.ws_connect(ws_url(server)) as ws:
        await ws.send_bytes(b"\xff\xff\xff")
        assert (await receive(ws)).error.reason == "FRAME_INVALID"
        code, reason = await closed_with(ws)
    assert (code, reason) == (1007, "INVALID_ARGUMENT FRAME_INVALID")
    async with http.ws_connect(ws_url(server)) as ws:
        await send(ws, start())
        started = await receive(ws)
        await ws.send_bytes(b"\xff" * 64)
        event = await receive(ws)
        assert event.error.reason == "FRAME_INVALID"
        assert event.seq == started.seq  # outside the resumable log
        code, reason = await closed_with(ws)
    assert (code, reason) == (1007, "INVALID_ARGUMENT FRAME_INVALID")
    # JSON that is not a ChatRequest.
    async with http.ws_connect(ws_url(server), protocols=(JSON_PROTOCOL,)) as ws:
        await ws.send_str('{"nope": 1}')
        assert (await receive(ws)).error.reason == "FRAME_INVALID"
        code, reason = await closed_with(ws)
    assert code == 1007
    # A first frame that is not `start`: the error in-band, then 1008 (policy violation).
    async with http.ws_connect(ws_url(server)) as ws:
        await send(ws, message("hi", "m1"))
        event = await receive(ws)
        assert event.error.reason == "FIRST_FRAME_NOT_START"
        assert event.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        code, reason = await closed_with(ws)
    assert (code, reason) == (1008, "INVALID_ARGUMENT FIRST_FRAME_NOT_START")
    # Resuming a session that does not exist.
    async with http.ws_connect(ws_url(server)) as ws:
        await send(ws, start("no-such-session"))
        assert (await receive(ws)).error.reason == "SESSION_NOT_FOUND"
        code, reason = await closed_with(ws)
    assert (code, reason) == (1008, "INVALID_ARGUMENT SESSION_NOT_FOUND")


async def test_bad_requests_inside_a_session_are_error_events(
    server: KoreroServer, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(ws_url(server)) as ws:
        await send(ws, start())
        await receive(ws)
        await send(ws, start())
        assert (await receive(ws)).error.reason == "SESSION_ALREADY_STARTED"
        await send(ws, message("", "m1"))
        assert (await receive(ws)).error.reason == "MESSAGE_EMPTY"
        await send(ws, pb.ChatRequest())
        assert (await receive(ws)).error.reason == "REQUEST_EMPTY"
        await send(ws, message("still here?", "m2"))
        assert (await turn_events(ws))[-1].WhichOneof("kind") == "done"


def adapter_with(
    settings: Settings, server: KoreroServer, authenticator: Authenticator
) -> WebSocketServer:
    """A second adapter on the running server's engine, behind `authenticator`."""
    return WebSocketServer(
        engine=server.engine,
        gate=CallGate(
            authenticator=authenticator,
            open_methods=settings.auth.open_methods,
            default_tenant=settings.engine.tenant,
        ),
        listen="127.0.0.1:0",
        rules=StreamRules.from_settings(settings.server),
    )


class RecordingAuthenticator:
    """Accepts `Bearer good` as tenant `acme`; records what each socket presented."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def authenticate(self, authorization: str | None) -> Identity:
        self.seen.append(authorization)
        if authorization != "Bearer good":
            raise KoreroError(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID", "bad token")
        return Identity(tenant="acme")


async def test_credentials_reach_the_authenticator_from_each_place(
    server: KoreroServer, settings: Settings, http: aiohttp.ClientSession
) -> None:
    auth = RecordingAuthenticator()
    adapter = adapter_with(settings, server, auth)
    await adapter.start()
    try:
        bearer = BEARER_PREFIX + base64.urlsafe_b64encode(b"good").decode().rstrip("=")
        async with http.ws_connect(ws_url(adapter), protocols=(PROTO_PROTOCOL, bearer)) as ws:
            assert ws.protocol == PROTO_PROTOCOL  # the token is never echoed back
            await send(ws, start())
            session_id = (await receive(ws)).session_id
        # Keys are the authenticated tenant's.
        assert (await server.engine.get_session("acme", session_id)).session_id == session_id
        async with http.ws_connect(ws_url(adapter)) as ws:
            await ws.send_str(json.dumps({"authorization": "Bearer good"}))
            await send(ws, start())
            assert (await receive(ws)).WhichOneof("kind") == "session_started"
        async with http.ws_connect(ws_url(adapter), headers={"Authorization": "Bearer bad"}) as ws:
            await send(ws, start())
            assert (await receive(ws)).error.reason == "TOKEN_INVALID"
            code, reason = await closed_with(ws)
        assert (code, reason) == (1008, "UNAUTHENTICATED TOKEN_INVALID")
        assert auth.seen == ["Bearer good", "Bearer good", "Bearer bad"]
    finally:
        await adapter.close()


async def test_drain_refuses_new_sockets_finishes_turns_then_closes_with_1012(
    settings: Settings, sim: UpstreamSim, http: aiohttp.ClientSession
) -> None:
    sim.config = SimConfig(ttft=0.1, tokens_per_second=40, answer_tokens=20)  # ~0.6 s
    app = await KoreroServer.start(settings)
    try:
        url = ws_url(app)
        async with http.ws_connect(url) as busy, http.ws_connect(url) as idle:
            for ws in (busy, idle):
                await send(ws, start())
                await receive(ws)
            await send(busy, message("in flight", "m1"))
            assert (await receive(busy)).WhichOneof("kind") == "turn_started"
            shutdown = asyncio.create_task(app.shutdown(grace=5.0))
            # The idle socket is told at once, in-band and by its close code.
            assert (await receive(idle)).error.reason == "SERVER_SHUTTING_DOWN"
            assert await closed_with(idle) == (1012, "UNAVAILABLE SERVER_SHUTTING_DOWN")
            # A new socket is refused the same way.
            async with http.ws_connect(url) as late:
                assert (await receive(late)).error.reason == "SERVER_SHUTTING_DOWN"
                assert (await closed_with(late))[0] == 1012
            # The busy one gets its whole answer first.
            events = await turn_events(busy)
            assert events[-1].done.finish_reason == pb.FINISH_REASON_STOP
            assert (await receive(busy)).error.reason == "SERVER_SHUTTING_DOWN"
            assert (await closed_with(busy))[0] == 1012
            await asyncio.wait_for(shutdown, 10)
    finally:
        if app.websocket is not None and app.websocket.open_sockets:
            await app.shutdown(grace=0)


class BrokenAuthenticator:
    async def authenticate(self, authorization: str | None) -> Identity:
        raise RuntimeError("identity provider exploded")


async def test_an_unexpected_failure_closes_with_1011(
    server: KoreroServer, settings: Settings, http: aiohttp.ClientSession
) -> None:
    adapter = adapter_with(settings, server, BrokenAuthenticator())
    await adapter.start()
    try:
        async with http.ws_connect(ws_url(adapter)) as ws:
            await send(ws, start())
            assert (await receive(ws)).error.reason == "INTERNAL"
            assert await closed_with(ws) == (1011, "INTERNAL INTERNAL")
    finally:
        await adapter.close()


@pytest.mark.slow
async def test_sigterm_closes_sockets_with_1012_after_their_turn(
    redis_url: str, sim: UpstreamSim, http: aiohttp.ClientSession
) -> None:
    sim.config = SimConfig(ttft=0.1, tokens_per_second=30, answer_tokens=15)  # ~0.6 s
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "korero"),
        "serve",
        "--listen",
        "127.0.0.1:0",
        env={
            **os.environ,
            "KORERO_POSTGRES_URL": "off",
            "REDIS_URL": redis_url,
            "KORERO_LLM_BASE_URL": sim.base_url,
            "KORERO_WS_LISTEN": "127.0.0.1:0",
            "KORERO_SHUTDOWN_GRACE": "5",
        },
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        port = 0
        async with asyncio.timeout(45):
            while not port:
                line = await proc.stderr.readline()
                assert line, "server exited before serving"
                if match := re.search(rb"event=ws_serving address=\S+:(\d+)", line):
                    port = int(match.group(1))
        url = f"ws://127.0.0.1:{port}{CHAT_PATH}"
        async with http.ws_connect(url) as busy:
            await send(busy, start())
            await receive(busy)
            await send(busy, message("in flight", "m1"))
            assert (await receive(busy)).WhichOneof("kind") == "turn_started"
            proc.send_signal(signal.SIGTERM)
            events = await turn_events(busy)
            assert events[-1].done.finish_reason == pb.FINISH_REASON_STOP
            assert (await receive(busy)).error.reason == "SERVER_SHUTTING_DOWN"
            assert await closed_with(busy) == (1012, "UNAVAILABLE SERVER_SHUTTING_DOWN")
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

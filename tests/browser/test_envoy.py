"""The Envoy sidecar as operators and browsers meet it: config, grpcurl, CORS, native gRPC."""

from __future__ import annotations

import asyncio
import base64
import shutil
import struct
import sys
from pathlib import Path

import aiohttp
import pytest
from google.rpc import error_details_pb2, status_pb2

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.server.transport.websocket import CHAT_PATH
from tests.browser.envoy import ROOT, EnvoyProcess, render_config, validate
from tests.helpers import RawH2Client, kinds, run_turn

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"
ORIGIN = "http://localhost:5173"

pytestmark = pytest.mark.slow  # starts Envoy


def test_committed_and_rendered_configs_are_valid(tmp_path: Path) -> None:
    committed = validate(ROOT / "envoy" / "envoy.yaml")
    assert committed.returncode == 0, committed.stdout + committed.stderr
    assert "OK" in committed.stdout + committed.stderr
    rendered = render_config(
        tmp_path / "envoy.yaml", {"ENVOY_LISTEN_PORT": "18080", "KORERO_GRPC_PORT": "50999"}
    )
    text = rendered.read_text()
    assert "port_value: 18080  # ${ENVOY_LISTEN_PORT}" in text
    assert "port_value: 50999  # ${KORERO_GRPC_PORT}" in text
    assert "port_value: 9901  # ${ENVOY_ADMIN_PORT}" in text  # unset: the default stays
    result = validate(rendered)
    assert result.returncode == 0, result.stdout + result.stderr


async def _grpcurl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return int(proc.returncode or 0), out.decode()


async def test_grpcurl_through_envoy_and_direct(
    web_server: KoreroServer, envoy: EnvoyProcess
) -> None:
    for target in (envoy.target, f"127.0.0.1:{web_server.port}"):
        code, out = await _grpcurl("-plaintext", target, "list")
        assert code == 0, f"{target}: {out}"
        assert "korero.chat.v1.ChatService" in out.split()
        assert "grpc.health.v1.Health" in out.split()
        code, out = await _grpcurl("-plaintext", target, "grpc.health.v1.Health/Check")
        assert code == 0, f"{target}: {out}"
        assert '"status": "SERVING"' in out


async def test_native_grpc_chat_through_the_same_listener(envoy: EnvoyProcess) -> None:
    async with ChatClient(envoy.target) as client:
        conversation = await client.conversation()
        events = await run_turn(conversation, "Hello through Envoy", "n1")
    assert kinds(events)[0] == "turn_started"
    assert kinds(events)[-1] == "done"


def _grpc_web_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


async def test_cors_preflight_and_grpc_web_response_headers(envoy: EnvoyProcess) -> None:
    path = f"http://{envoy.target}/korero.chat.v1.ChatService/SendMessage"
    async with aiohttp.ClientSession() as http:
        async with http.options(
            path,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-grpc-web,"
                "x-user-agent,grpc-timeout",
            },
        ) as preflight:
            assert preflight.status == 200
            assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
            allowed = preflight.headers["Access-Control-Allow-Headers"]
            for header in ("authorization", "x-grpc-web", "grpc-timeout", "content-type"):
                assert header in allowed
        request = pb.SendMessageRequest(
            message=pb.UserMessage(client_message_id="w1", text="Hello over gRPC-Web")
        )
        async with http.post(
            path,
            data=_grpc_web_frame(request.SerializeToString()),
            headers={
                "Origin": ORIGIN,
                "Content-Type": "application/grpc-web+proto",
                "X-Grpc-Web": "1",
            },
        ) as response:
            body = await response.read()
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
            exposed = response.headers["Access-Control-Expose-Headers"]
            for header in ("grpc-status", "grpc-message", "grpc-status-details-bin"):
                assert header in exposed
        # An origin that is not allowed gets no CORS grant.
        async with http.options(
            path,
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        ) as denied:
            assert "Access-Control-Allow-Origin" not in denied.headers
    # The body is gRPC-Web frames: messages (flag 0) then trailers (flag 0x80).
    frames, offset = [], 0
    while offset < len(body):
        flag, size = body[offset], struct.unpack(">I", body[offset + 1 : offset + 5])[0]
        frames.append((flag, body[offset + 5 : offset + 5 + size]))
        offset += 5 + size
    events = [pb.SendMessageResponse.FromString(data).event for flag, data in frames if flag == 0]
    assert kinds(events)[0] == "session_started"
    assert kinds(events)[-1] == "done"
    assert frames[-1][0] == 0x80
    assert b"grpc-status:0" in frames[-1][1].replace(b" ", b"")


async def test_websocket_route_and_page_through_envoy(envoy: EnvoyProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(envoy.url) as page:
            assert page.status == 200
            assert "Kōrero chat" in await page.text()
        async with http.get(f"{envoy.url}app.js") as script:
            assert script.status == 200
        async with http.get(f"{envoy.url}nope.js") as missing:
            assert missing.status == 404
        async with http.ws_connect(f"ws://{envoy.target}{CHAT_PATH}") as ws:
            await ws.send_bytes(pb.ChatRequest(start=pb.StartSession()).SerializeToString())
            msg = await ws.receive(timeout=5)
            event = pb.ChatResponse.FromString(msg.data).event
            assert event.WhichOneof("kind") == "session_started"


# The bodies of tests/server/test_malformed_requests.py, and the reason each gets there.
MALFORMED = {
    "empty": (b"", "REQUEST_MISSING"),
    "truncated": (b"\x00\x00\x00\x00\x64" + b"\x0a\x02ab", "REQUEST_MISSING"),  # says 100, sends 4
    # A whole gRPC message whose bytes are not protobuf (wire type 7 does not exist).
    "undecodable": (b"\x00" + struct.pack(">I", 64) + b"\xff" * 64, "REQUEST_UNDECODABLE"),
}


def _reason(headers: dict[str, str]) -> str:
    """The ErrorInfo reason in `grpc-status-details-bin` ("" if there is none)."""
    raw = headers.get("grpc-status-details-bin", "")
    status = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


@pytest.mark.parametrize("method", ["GetSession", "SendMessage"])
@pytest.mark.parametrize("body", list(MALFORMED), ids=list(MALFORMED))
async def test_malformed_bodies_through_envoy_are_answered_at_once(
    envoy: EnvoyProcess, method: str, body: str
) -> None:
    path = f"/korero.chat.v1.ChatService/{method}"
    data, reason = MALFORMED[body]
    # Native gRPC over HTTP/2, frames written by hand.
    async with RawH2Client(envoy.port) as raw:
        answer = await raw.call(path, data, timeout=1.0)
    assert answer is not None, f"{body} body: no answer through Envoy within a second"
    assert answer["grpc-status"] == "3"
    assert _reason(answer) == reason  # the same as direct: Envoy passes the details on
    # gRPC-Web, as a browser would send it.
    async with (
        aiohttp.ClientSession() as http,
        asyncio.timeout(1.0),
        http.post(
            f"http://{envoy.target}{path}",
            data=data,
            headers={"Content-Type": "application/grpc-web+proto", "X-Grpc-Web": "1"},
        ) as response,
    ):
        payload = await response.read()
        trailers = {k.lower(): v for k, v in response.headers.items()}
    if "grpc-status" not in trailers:  # trailers in the body: a gRPC-Web frame flagged 0x80
        assert payload[:1] == b"\x80"
        trailers = {
            k.strip().lower(): v.strip()
            for k, v in (
                line.split(":", 1) for line in payload[5:].decode().split("\r\n") if ":" in line
            )
        }
    assert trailers["grpc-status"] == "3"
    assert _reason(trailers) == reason

"""Malformed requests: undecodable frames, empty or truncated bodies, a failing reader.

Each is answered at once with a typed status (or an in-band `error` event and
a status, on a stream) — never a hang, never a Python class name — and
leaves nothing behind: not in Redis, not in the server's memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.sim import UpstreamSim
from tests.helpers import RawH2Client, run_turn
from tests.server.test_lifecycle import start_server_process

SERVICE = "/korero.chat.v1.ChatService"
UNDECODABLE = b"\xff" * 64  # wire type 7 does not exist: no protobuf parser accepts it
BODIES = {
    "empty": b"",
    "truncated": b"\x00\x00\x00\x00\x64" + b"\x0a\x02ab",  # says 100 bytes, sends 4
    "half-a-prefix": b"\x00\x00\x00",
}


def _reason(headers: dict[str, str]) -> str:
    raw = headers.get("grpc-status-details-bin", "")
    status = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


@pytest.mark.parametrize("method", ["GetSession", "ListMessages", "SendMessage"])
@pytest.mark.parametrize("body", list(BODIES), ids=list(BODIES))
async def test_empty_or_truncated_bodies_are_invalid_argument_within_a_second(
    server: KoreroServer, method: str, body: str
) -> None:
    async with RawH2Client(server.port) as raw:
        answer = await raw.call(f"{SERVICE}/{method}", BODIES[body], timeout=1.0)
    assert answer is not None, f"{method} with a {body} body: no answer within a second"
    assert answer["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert _reason(answer) == "REQUEST_MISSING"


@pytest.mark.parametrize("method", ["GetSession", "ListMessages", "SendMessage"])
async def test_undecodable_requests_are_invalid_argument_without_a_class_name(
    server: KoreroServer, method: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        path = f"{SERVICE}/{method}"

        async def call() -> None:
            async with asyncio.timeout(2):
                if method == "SendMessage":
                    async for _ in channel.unary_stream(path)(UNDECODABLE):
                        pass
                else:
                    await channel.unary_unary(path)(UNDECODABLE)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call()
    error = ChatError.from_rpc_error(info.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "REQUEST_UNDECODABLE"
    details = info.value.details() or ""
    assert "class" not in details
    assert "DecodeError" not in details


async def test_an_undecodable_chat_frame_ends_the_stream_with_an_event_and_a_status(
    server: KoreroServer, client: ChatClient
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(
            f"{SERVICE}/Chat", response_deserializer=pb.ChatResponse.FromString
        )()
        await call.write(pb.ChatRequest(start=pb.StartSession()).SerializeToString())
        started = (await call.read()).event
        await call.write(UNDECODABLE)
        valid = pb.ChatRequest(message=pb.UserMessage(client_message_id="v1", text="still there?"))
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(valid.SerializeToString())  # the stream may have ended already
        events: list[pb.Event] = []

        async def read_all() -> None:
            async with asyncio.timeout(1.0):
                while (response := await call.read()) is not grpc.aio.EOF:
                    events.append(response.event)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_all()
    assert [e.error.reason for e in events if e.WhichOneof("kind") == "error"] == [
        "REQUEST_UNDECODABLE"
    ]
    assert all(e.WhichOneof("kind") in ("error", "heartbeat") for e in events), events
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Bad input changes nothing that is stored (the valid message after it is not taken).
    session = await client.get_session(started.session_id)
    assert (session.message_count, session.turn_count) == (0, 0)


async def test_a_failing_chat_reader_ends_the_stream_with_internal(
    server: KoreroServer, client: ChatClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(server.engine, "start_turn", explode)
    # Without the client's own reconnect, so the ended stream is what the test sees.
    async with ChatClient(f"127.0.0.1:{server.port}", reconnect=None) as plain:
        conversation = await plain.conversation()
        async with asyncio.timeout(5):
            events = await run_turn(conversation, "hello?", "x1")
            assert events[-1].error.reason == "INTERNAL"
            assert "RuntimeError" not in events[-1].error.message
            with pytest.raises(ChatError) as info:
                await run_turn(conversation, "anyone?", "x2")
    assert info.value.code == grpc.StatusCode.INTERNAL


async def test_a_failing_websocket_reader_closes_with_1011(
    server: KoreroServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(server.engine, "start_turn", explode)
    assert server.websocket is not None
    url = f"ws://{server.websocket.address}/ws/chat"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws, asyncio.timeout(2):
        await ws.send_bytes(pb.ChatRequest(start=pb.StartSession()).SerializeToString())
        await ws.receive()  # session_started
        message = pb.ChatRequest(message=pb.UserMessage(client_message_id="x1", text="hi"))
        await ws.send_bytes(message.SerializeToString())
        event = pb.ChatResponse.FromString((await ws.receive()).data).event
        assert event.error.reason == "INTERNAL"
        closing = await ws.receive()
    assert closing.type == aiohttp.WSMsgType.CLOSE
    assert (closing.data, closing.extra) == (1011, "INTERNAL INTERNAL")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _malformed_calls(port: int, count: int) -> list[dict[str, str] | None]:
    answers: list[dict[str, str] | None] = []
    async with RawH2Client(port) as raw:
        for start in range(0, count, 100):  # 100 in flight at a time
            batch = [
                raw.start(f"{SERVICE}/{('GetSession', 'SendMessage')[i % 2]}", b"")
                for i in range(start, min(count, start + 100))
            ]
            done, pending = await asyncio.wait(batch, timeout=5)
            answers += [f.result() for f in done] + [None] * len(pending)
            for future in pending:
                future.cancel()
    return answers


@pytest.mark.slow
async def test_malformed_calls_leave_no_memory_behind(redis_url: str, sim: UpstreamSim) -> None:
    server = await start_server_process(
        {
            "REDIS_URL": redis_url,
            "KORERO_LLM_BASE_URL": sim.base_url,
            "KORERO_METRICS_LISTEN": "127.0.0.1:0",
            "KORERO_RATE_LIMITS": "false",  # 2,500 calls: not a rate-limit test
        }
    )
    try:
        warm = await _malformed_calls(server.port, 500)
        assert all(a is not None and a["grpc-status"] == "3" for a in warm)
        before = _rss_kib(server.proc.pid)
        started = time.monotonic()
        answers = await _malformed_calls(server.port, 2000)
        took = time.monotonic() - started
        await asyncio.sleep(0.5)
        grown = _rss_kib(server.proc.pid) - before
        assert sum(a is None for a in answers) == 0, "some calls were never answered"
        assert {a["grpc-status"] for a in answers if a is not None} == {"3"}
        # Unanswered, 2,000 such calls held ~36 MiB; answered, they hold nothing.
        assert grown < 6 * 1024, f"RSS grew {grown} KiB over 2,000 malformed calls ({took:.1f}s)"
    finally:
        server.proc.kill()
        await server.proc.wait()

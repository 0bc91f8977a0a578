"""Bad input gets INVALID_ARGUMENT with a reason, and corrupts nothing stored."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.sim import SimConfig, UpstreamSim
from tests.helpers import RawChat, kinds, run_turn

CODE = {c.value[0]: c for c in grpc.StatusCode}


async def _stored(client: ChatClient, session_id: str) -> tuple[list[str], int, int]:
    history = await client.list_messages(session_id)
    session = await client.get_session(session_id)
    return [m.text for m in history.messages], session.turn_count, session.last_seq


@pytest.mark.parametrize(
    ("text", "cmid", "reason"),
    [
        ("", "e1", "MESSAGE_EMPTY"),
        ("   \n\t ", "e2", "MESSAGE_EMPTY"),
        ("x" * 8001, "e3", "MESSAGE_TOO_LARGE"),
        ("ā" * 4001, "e4", "MESSAGE_TOO_LARGE"),  # 8002 bytes of UTF-8
        ("hello", "", "CLIENT_MESSAGE_ID_REQUIRED"),
        ("hello", "k" * 129, "CLIENT_MESSAGE_ID_INVALID"),
    ],
)
async def test_bad_message_is_rejected_in_stream_and_stores_nothing(
    client: ChatClient, sim: UpstreamSim, text: str, cmid: str, reason: str
) -> None:
    chat = await RawChat.open(client.stub)  # raw frames: the client would fill in an empty id
    await chat.turn("A good question", "ok-1")
    before = await _stored(client, chat.session_id)
    await chat.write(pb.ChatRequest(message=pb.UserMessage(client_message_id=cmid, text=text)))
    event = await chat.next_event()
    assert event.WhichOneof("kind") == "error"
    assert CODE[event.error.code] == grpc.StatusCode.INVALID_ARGUMENT
    assert event.error.reason == reason
    assert not event.error.retryable
    assert event.turn_id == ""
    assert await _stored(client, chat.session_id) == before
    assert len(sim.requests) == 1
    # The stream and the session carry on.
    assert kinds(await chat.turn("Another good one", "ok-2"))[-1] == "done"
    chat.close()


async def test_first_frame_must_be_start(server: KoreroServer) -> None:
    async with ChatClient(f"127.0.0.1:{server.port}") as c:
        call = c.stub.Chat()
        await call.write(pb.ChatRequest(message=pb.UserMessage(client_message_id="a", text="hi")))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        error = ChatError.from_rpc_error(info.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.reason == "FIRST_FRAME_NOT_START"


async def test_stream_closed_before_first_frame(server: KoreroServer) -> None:
    async with ChatClient(f"127.0.0.1:{server.port}") as c:
        call = c.stub.Chat()
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert ChatError.from_rpc_error(info.value).reason == "FIRST_FRAME_MISSING"


@pytest.mark.parametrize("session_id", ["has space", "x" * 65, "a}b", "kr:{t:s}"])
async def test_malformed_session_id_is_rejected(client: ChatClient, session_id: str) -> None:
    with pytest.raises(ChatError) as info:
        await client.conversation(session_id=session_id)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.reason == "SESSION_ID_INVALID"


async def test_oversize_metadata_is_rejected(client: ChatClient) -> None:
    with pytest.raises(ChatError) as info:
        await client.conversation(metadata=pb.SessionMetadata(customer_name="n" * 300))
    assert info.value.reason == "METADATA_TOO_LARGE"


async def test_message_while_turn_in_flight_is_rejected(
    client: ChatClient, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(ttft=0.3, answer_tokens=5)
    chat = await RawChat.open(client.stub)
    first = asyncio.create_task(chat.turn("first", "a1"))
    await sim.wait_for(lambda r: True)
    await chat.write(pb.ChatRequest(message=pb.UserMessage(client_message_id="a2", text="second")))
    events = await first
    rejected = [e for e in events if e.WhichOneof("kind") == "error"]
    assert len(rejected) == 1
    assert rejected[0].error.reason == "TURN_IN_FLIGHT"
    assert rejected[0].error.client_message_id == "a2"
    assert events[-1].WhichOneof("kind") == "done"
    history = await client.list_messages(chat.session_id)
    assert [m.text for m in history.messages if m.role == pb.ROLE_USER] == ["first"]
    assert len(sim.requests) == 1
    chat.close()


async def test_turn_in_flight_on_another_stream_is_rejected(
    client: ChatClient, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(ttft=0.3, answer_tokens=5)
    a = await client.conversation()
    b = await client.conversation(session_id=a.session_id)
    first = asyncio.create_task(run_turn(a, "first", "a1"))
    await sim.wait_for(lambda r: True)
    events = await run_turn(b, "second", "b1")
    assert events[-1].error.reason == "TURN_IN_FLIGHT"
    assert (await first)[-1].WhichOneof("kind") == "done"
    # Once the turn ended, the other stream may talk.
    assert (await run_turn(b, "second", "b1"))[-1].WhichOneof("kind") == "done"


async def test_send_message_with_bad_input_is_invalid_argument(server: KoreroServer) -> None:
    async with ChatClient(f"127.0.0.1:{server.port}") as c:
        call = c.stub.SendMessage(
            pb.SendMessageRequest(message=pb.UserMessage(client_message_id="x", text=""))
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        error = ChatError.from_rpc_error(info.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.reason == "MESSAGE_EMPTY"

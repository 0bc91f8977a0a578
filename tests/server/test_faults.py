"""Upstream faults, cancellation and deadlines: each turn ends with exactly one
terminal event, the session survives, and cancellation reaches the upstream."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.server.settings import Settings
from korero.sim import Fault, SimConfig, UpstreamSim
from tests.conftest import make_settings
from tests.helpers import kinds, run_turn, terminals, text_of

CODE = {c.value[0]: c for c in grpc.StatusCode}


async def _after_fault(client: ChatClient, fault: Fault, sim: UpstreamSim) -> list[pb.Event]:
    sim.inject(fault)
    conversation = await client.conversation()
    events = await run_turn(conversation, "Will this work?", "f1")
    assert len(terminals(events)) == 1, kinds(events)
    assert kinds(events)[-1] in ("done", "error")
    # The session survives: the next turn succeeds.
    sim.clear_faults()
    after = await run_turn(conversation, "And now?", "f2")
    assert kinds(after)[-1] == "done"
    return events


async def test_rate_limit_is_retried_before_the_first_token(
    client: ChatClient, sim: UpstreamSim
) -> None:
    events = await _after_fault(client, Fault("rate_limit", retry_after=0.05), sim)
    assert kinds(events)[-1] == "done"
    assert len(sim.requests) == 3  # 429, retry that succeeded, next turn


@pytest.mark.parametrize(
    ("fault", "code", "reason"),
    [
        (
            Fault("rate_limit", count=5, retry_after=0.01),
            "RESOURCE_EXHAUSTED",
            "UPSTREAM_RATE_LIMITED",
        ),
        (Fault("server_error", count=5), "UNAVAILABLE", "UPSTREAM_SERVER_ERROR"),
        (Fault("status", status=401), "INTERNAL", "UPSTREAM_AUTH_FAILED"),
        (Fault("status", status=404), "INTERNAL", "UPSTREAM_MODEL_NOT_FOUND"),
        (Fault("cut", after_tokens=3), "UNAVAILABLE", "UPSTREAM_STREAM_INTERRUPTED"),
    ],
)
async def test_upstream_failure_ends_the_turn_with_one_typed_error(
    client: ChatClient, sim: UpstreamSim, fault: Fault, code: str, reason: str
) -> None:
    events = await _after_fault(client, fault, sim)
    error = events[-1].error
    assert CODE[error.code].name == code
    assert error.reason == reason
    assert error.message
    assert error.client_message_id == "f1"


async def test_no_retry_after_the_first_token(client: ChatClient, sim: UpstreamSim) -> None:
    sim.inject(Fault("cut", after_tokens=3))
    conversation = await client.conversation()
    events = await run_turn(conversation, "Cut me off", "c1")
    assert events[-1].error.retryable
    assert text_of(events)  # part of the answer was streamed
    assert len(sim.requests) == 1  # and the call was not repeated


async def test_stall_before_first_token_times_out_and_closes_upstream(
    redis_url: str, sim: UpstreamSim
) -> None:
    settings = make_settings(
        redis_url, sim.base_url, llm__first_token_timeout=0.3, llm__max_retries=0
    )
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            sim.inject(Fault("stall", after_tokens=0))
            conversation = await client.conversation()
            started = time.monotonic()
            events = await run_turn(conversation, "Anyone there?", "s1")
            assert time.monotonic() - started < 3
            assert events[-1].error.reason == "FIRST_TOKEN_TIMEOUT"
            assert CODE[events[-1].error.code] == grpc.StatusCode.DEADLINE_EXCEEDED
            await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=2)
    finally:
        await app.shutdown(grace=0)


async def test_client_deadline_is_honoured(client: ChatClient, sim: UpstreamSim) -> None:
    sim.config = SimConfig(ttft=0.1, tokens_per_second=20, answer_tokens=200)
    conversation = await client.conversation(stream_timeout=1.0)
    events = await run_turn(conversation, "A long answer please", "d1")
    assert len(terminals(events)) == 1
    assert events[-1].error.reason == "TURN_DEADLINE_EXCEEDED"
    await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=2)


async def test_cancel_message_cancels_the_upstream_request(
    client: ChatClient, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(tokens_per_second=20, answer_tokens=200)
    conversation = await client.conversation()
    events: list[pb.Event] = []
    async for event in conversation.send("Tell me everything", "x1"):
        events.append(event)
        if event.WhichOneof("kind") == "text_delta":
            await conversation.cancel()
    assert events[-1].done.finish_reason == pb.FINISH_REASON_CANCELLED
    assert len(terminals(events)) == 1
    recorded = await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=2)
    assert recorded.tokens_sent < 200
    # The session survives a cancel.
    sim.config = SimConfig()
    assert kinds(await run_turn(conversation, "Short one", "x2"))[-1] == "done"


async def test_answers_read_to_the_end_reuse_the_upstream_connection(
    client: ChatClient, sim: UpstreamSim
) -> None:
    conversation = await client.conversation()
    for n in range(3):
        assert kinds(await run_turn(conversation, f"Question {n}", f"k{n}"))[-1] == "done"
    ports = {r.client_port for r in sim.requests}
    assert len(ports) == 1, ports  # one kept-alive connection, not one per answer
    # A cancelled answer closes its connection (the upstream sees it): the next one is new.
    sim.config = SimConfig(tokens_per_second=20, answer_tokens=200)
    async for event in conversation.send("Tell me everything", "k3"):
        if event.WhichOneof("kind") == "text_delta":
            await conversation.cancel()
    await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=2)
    sim.config = SimConfig()
    assert kinds(await run_turn(conversation, "Short one", "k4"))[-1] == "done"
    assert sim.requests[-1].client_port not in ports


async def test_client_disconnect_cancels_the_upstream_request(
    server: KoreroServer, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(tokens_per_second=20, answer_tokens=200)
    client = ChatClient(f"127.0.0.1:{server.port}")
    conversation = await client.conversation()
    async for event in conversation.send("Talk for a while", "g1"):
        if event.WhichOneof("kind") == "text_delta":
            break
    await client.close()  # the client goes away mid-answer
    recorded = await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=3)
    assert recorded.finished_at is None
    for _ in range(100):
        if server.engine.active_turns == 0:
            break
        await asyncio.sleep(0.02)
    assert server.engine.active_turns == 0


async def test_send_message_cancelled_by_client_cancels_upstream(
    server: KoreroServer, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(tokens_per_second=20, answer_tokens=200)
    async with ChatClient(f"127.0.0.1:{server.port}") as c:
        call = c.stub.SendMessage(
            pb.SendMessageRequest(message=pb.UserMessage(client_message_id="z", text="Go on"))
        )
        async for response in call:
            if response.event.WhichOneof("kind") == "text_delta":
                call.cancel()
                break
    await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=3)


async def test_unreachable_upstream_is_a_typed_error(redis_url: str, settings: Settings) -> None:
    settings = make_settings(
        redis_url, "http://127.0.0.1:9/v1", llm__max_retries=1
    )  # port 9: nothing listens
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            events = await run_turn(conversation, "Hello?", "u1")
            assert events[-1].error.reason == "UPSTREAM_UNREACHABLE"
            assert events[-1].error.retryable
    finally:
        await app.shutdown(grace=0)

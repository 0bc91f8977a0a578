"""Resume from a cursor: exact replay, joining the turn in flight (here or on another
instance), the detach grace, a bounded log that says when it was truncated, and seq
working as a cursor on every stream."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.sim import SimConfig, UpstreamSim
from tests.conftest import make_settings
from tests.helpers import kinds, run_turn, text_of

SLOW = SimConfig(ttft=0.05, tokens_per_second=40, answer_tokens=40)


async def _read_until_terminal(call: object, out: list[pb.Event], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            response = await call.read()  # type: ignore[attr-defined]
            if response is grpc.aio.EOF:
                return
            out.append(response.event)
            if response.event.WhichOneof("kind") in ("done", "error") and response.event.turn_id:
                return


async def _resume(client: ChatClient, session_id: str, after_seq: int) -> tuple[object, pb.Event]:
    return await client.open_call(session_id, None, None, after_seq=after_seq)


async def _break_mid_answer(
    port: int, sim: UpstreamSim, text: str, cmid: str, deltas: int = 2
) -> tuple[str, list[pb.Event]]:
    """Send a message and drop the connection after `deltas` text deltas."""
    sim.config = SLOW
    client = ChatClient(f"127.0.0.1:{port}", reconnect=None)
    conversation = await client.conversation()
    got: list[pb.Event] = []
    async for event in conversation.send(text, cmid):
        got.append(event)
        if len([e for e in got if e.WhichOneof("kind") == "text_delta"]) >= deltas:
            break
    await client.close()  # the connection goes away mid-answer
    return conversation.session_id, got


async def test_replay_is_exactly_the_missed_events(client: ChatClient) -> None:
    conversation = await client.conversation()
    first = await run_turn(conversation, "What can I bring on board?", "a")
    second = await run_turn(conversation, "And liquids?", "b")
    everything = [conversation.started, *first, *second]
    for cursor in (0, first[2].seq, first[-1].seq, second[-1].seq):
        call, started = await _resume(client, conversation.session_id, cursor)
        replay = started.session_started.replay
        assert started.seq == cursor
        assert replay.after_seq == cursor
        assert not replay.truncated
        missed = [e for e in everything[1:] if e.seq > cursor]
        assert replay.through_seq == (missed[-1].seq if missed else cursor)
        got: list[pb.Event] = []
        for _ in missed:
            got.append((await call.read()).event)  # type: ignore[attr-defined]
        assert [e.SerializeToString() for e in got] == [m.SerializeToString() for m in missed]
        call.cancel()  # type: ignore[attr-defined]


async def test_a_dropped_client_resumes_mid_answer_and_gets_the_rest(
    server: KoreroServer, sim: UpstreamSim
) -> None:
    session_id, before = await _break_mid_answer(server.port, sim, "Tell me a story", "s1")
    async with ChatClient(f"127.0.0.1:{server.port}") as client:
        call, _ = await _resume(client, session_id, before[-1].seq)
        rest: list[pb.Event] = []
        await _read_until_terminal(call, rest)
        call.cancel()  # type: ignore[attr-defined]
    seqs = [e.seq for e in before + rest]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gap, no duplicate"
    assert rest[-1].done.finish_reason == pb.FINISH_REASON_STOP
    assert text_of(before + rest) == sim.answer_for(sim.requests[0].body["messages"])
    assert len(sim.requests) == 1
    assert sim.requests[0].disconnected_at is None


async def test_resume_on_another_instance_follows_the_turn_through_the_log(
    server: KoreroServer, settings: object, sim: UpstreamSim
) -> None:
    other = await KoreroServer.start(settings)  # type: ignore[arg-type]
    try:
        session_id, before = await _break_mid_answer(server.port, sim, "Tell me more", "o1")
        async with ChatClient(f"127.0.0.1:{other.port}") as client:
            call, _ = await _resume(client, session_id, before[-1].seq)
            rest: list[pb.Event] = []
            await _read_until_terminal(call, rest)
            call.cancel()  # type: ignore[attr-defined]
        seqs = [e.seq for e in before + rest]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert kinds(rest)[-1] == "done"
        assert text_of(before + rest) == sim.answer_for(sim.requests[0].body["messages"])
        assert len(sim.requests) == 1  # the other instance did not ask the model again
        assert sim.requests[0].disconnected_at is None  # the detach grace did not cancel it
    finally:
        await other.shutdown(grace=0.5)


async def test_detach_grace_then_cancel_reaches_the_upstream(
    redis_url: str, sim: UpstreamSim
) -> None:
    app = await KoreroServer.start(make_settings(redis_url, sim.base_url, engine__detach_grace=0.6))
    try:
        sim.config = SimConfig(tokens_per_second=20, answer_tokens=200)
        await _break_mid_answer(app.port, sim, "Talk for a while", "g1", deltas=1)
        dropped = time.monotonic()
        await asyncio.sleep(0.3)
        assert sim.requests[0].disconnected_at is None  # still generating within the grace
        recorded = await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=5)
        assert time.monotonic() - dropped >= 0.55
        assert recorded.finished_at is None
        for _ in range(100):
            if app.engine.active_turns == 0:
                break
            await asyncio.sleep(0.02)
        assert app.engine.active_turns == 0
    finally:
        await app.shutdown(grace=0)


async def test_a_bounded_log_says_when_replay_was_truncated(
    redis_url: str, sim: UpstreamSim
) -> None:
    app = await KoreroServer.start(
        make_settings(redis_url, sim.base_url, engine__event_log_max_events=5)
    )
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            events = await run_turn(conversation, "one", "t1")
            events += await run_turn(conversation, "two", "t2")
            call, started = await _resume(client, conversation.session_id, 1)
            replay = started.session_started.replay
            assert replay.truncated
            assert replay.first_seq == events[-1].seq - 4
            assert replay.through_seq == events[-1].seq
            got = [(await call.read()).event for _ in range(5)]  # type: ignore[attr-defined]
            assert [e.seq for e in got] == [e.seq for e in events[-5:]]
            call.cancel()  # type: ignore[attr-defined]
            # The history is still whole: the client is told to read it there.
            history = await client.list_messages(conversation.session_id)
            assert len(history.messages) == 4
    finally:
        await app.shutdown(grace=0)


async def test_a_cursor_beyond_the_session_is_refused(client: ChatClient) -> None:
    conversation = await client.conversation()
    events = await run_turn(conversation, "hi", "c1")
    with pytest.raises(ChatError) as info:
        await client.conversation(session_id=conversation.session_id, after_seq=events[-1].seq + 50)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.reason == "CURSOR_AHEAD"


# seq as a cursor: the three mismatches found from outside ----------------------------


@pytest.fixture
def slow_sim(sim: UpstreamSim) -> UpstreamSim:
    sim.config = SimConfig(ttft=0.3, tokens_per_second=60, answer_tokens=30)
    return sim


async def test_a_stream_joining_a_running_turn_never_goes_backwards(
    client: ChatClient, slow_sim: UpstreamSim
) -> None:
    a = await client.conversation()
    first = asyncio.create_task(run_turn(a, "Can I change my seat?", "x"))
    await slow_sim.wait_for(lambda r: True)
    b = await client.conversation(session_id=a.session_id)
    joined = await run_turn(b, "Can I change my seat?", "x")
    seqs = [b.started.seq] + [e.seq for e in joined]
    assert seqs == sorted(set(seqs)), f"B went backwards: {seqs}"
    assert b.started.seq < joined[0].seq
    assert [e.seq for e in joined] == [e.seq for e in await first]  # the same log, same numbers
    assert len(slow_sim.requests) == 1


async def test_last_seq_is_the_last_seq_sent_during_and_after_a_turn(
    client: ChatClient, slow_sim: UpstreamSim
) -> None:
    conversation = await client.conversation()
    seen: list[pb.Event] = []
    during: list[int] = []
    async for event in conversation.send("Tell me about lounges", "l1"):
        seen.append(event)
        if event.WhichOneof("kind") == "text_delta" and not during:
            await asyncio.sleep(0.25)  # the log catches up within its flush interval
            during.append((await client.get_session(conversation.session_id)).last_seq)
    assert seen[0].seq <= during[0] <= max(e.seq for e in seen)
    after = await client.get_session(conversation.session_id)
    assert after.last_seq == seen[-1].seq


async def test_no_jumps_after_a_resume_during_a_running_turn(
    client: ChatClient, slow_sim: UpstreamSim
) -> None:
    a = await client.conversation()
    running = asyncio.create_task(run_turn(a, "A long question", "j1"))
    await slow_sim.wait_for(lambda r: True)
    b = await client.conversation(session_id=a.session_id)  # a resume mid-turn
    first = await running
    slow_sim.config = SimConfig()
    second = await run_turn(a, "And then?", "j2")
    seqs = [e.seq for e in first + second]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # readable numbering, no jumps
    assert b.started.seq == 0
    await b.close()


async def test_send_message_into_a_busy_session_is_a_status(
    server: KoreroServer, slow_sim: UpstreamSim
) -> None:
    async with ChatClient(f"127.0.0.1:{server.port}") as client:
        a = await client.conversation()
        running = asyncio.create_task(run_turn(a, "first", "f1"))
        await slow_sim.wait_for(lambda r: True)
        call = client.stub.SendMessage(
            pb.SendMessageRequest(
                session_id=a.session_id,
                message=pb.UserMessage(client_message_id="f2", text="second"),
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "TURN_IN_FLIGHT" in str(info.value.trailing_metadata())
        await running


async def test_heartbeat_after_one_interval_of_silence(redis_url: str, sim: UpstreamSim) -> None:
    app = await KoreroServer.start(
        make_settings(redis_url, sim.base_url, server__heartbeat_interval=0.4)
    )
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            call, _ = await client.open_call("", None, None)
            opened = time.monotonic()
            beats = []
            for _ in range(3):
                response = await call.read()  # type: ignore[attr-defined]
                assert response.event.WhichOneof("kind") == "heartbeat"
                beats.append(time.monotonic() - opened)
            call.cancel()  # type: ignore[attr-defined]
        gaps = [b - a for a, b in zip([0.0, *beats], beats, strict=False)]
        assert all(0.3 <= g <= 0.6 for g in gaps), gaps  # one interval, not up to two
    finally:
        await app.shutdown(grace=0)


async def test_a_replayed_turn_starts_with_the_rate_limit_event(client: ChatClient) -> None:
    conversation = await client.conversation()
    first = await run_turn(conversation, "What is the baggage allowance?", "r1")
    again = await run_turn(conversation, "What is the baggage allowance?", "r1")
    assert kinds(first)[:2] == ["turn_started", "rate_limit"]
    assert kinds(again)[:2] == ["turn_started", "rate_limit"]
    assert again[0].turn_started.replayed


async def test_send_message_retried_with_a_cursor_gets_the_rest_of_the_same_turn(
    server: KoreroServer, sim: UpstreamSim
) -> None:
    sim.config = SLOW
    async with ChatClient(f"127.0.0.1:{server.port}") as client:
        session_id = (await client.conversation()).session_id
        request = pb.SendMessageRequest(
            session_id=session_id,
            message=pb.UserMessage(client_message_id="w1", text="Tell me about refunds"),
        )
        before: list[pb.Event] = []
        call = client.stub.SendMessage(request)
        async for response in call:
            before.append(response.event)
            if len([e for e in before if e.WhichOneof("kind") == "text_delta"]) >= 2:
                call.cancel()  # the browser's connection broke mid-answer
                break
        request.after_seq = before[-1].seq
        rest = [r.event async for r in client.stub.SendMessage(request)]
        # Retried once more after the end: the terminal event again, nothing new.
        request.after_seq = rest[-2].seq
        again = [r.event async for r in client.stub.SendMessage(request)]
    seqs = [e.seq for e in before + rest]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert not any(e.turn_started.replayed for e in rest)
    assert kinds(rest)[-1] == "done"
    assert text_of(before + rest) == sim.answer_for(sim.requests[0].body["messages"])
    assert [e.seq for e in again] == [rest[-1].seq]
    assert len(sim.requests) == 1

"""A conversation end to end: real server, real Redis, simulated upstream over HTTP."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.sim import UpstreamSim
from tests.helpers import kinds, run_turn, terminals, text_of


async def test_multi_turn_conversation_carries_history(
    client: ChatClient, sim: UpstreamSim
) -> None:
    meta = pb.SessionMetadata(customer_name="Aroha", booking_reference="KR7Q2X")
    conversation = await client.conversation(metadata=meta)
    started = conversation.started
    assert started.WhichOneof("kind") == "session_started"
    assert not started.session_started.resumed
    assert started.session_id

    first = await run_turn(conversation, "Where is my bag?", "m1")
    assert kinds(first)[0] == "turn_started"
    assert kinds(first)[-1] == "done"
    assert first[-1].done.finish_reason == pb.FINISH_REASON_STOP
    answer1 = text_of(first)
    assert answer1 == sim.answer_for(sim.requests[0].body["messages"])
    assert "Aroha" in answer1  # session metadata reached the prompt
    system = sim.requests[0].body["messages"][0]
    assert system["role"] == "system"
    assert "Booking reference: KR7Q2X" in system["content"]

    second = await run_turn(conversation, "And my return flight?", "m2")
    assert kinds(second)[-1] == "done"
    prompt = sim.requests[1].body["messages"]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert prompt[1]["content"] == "Where is my bag?"
    assert prompt[2]["content"] == answer1
    assert prompt[3]["content"] == "And my return flight?"

    history = await client.list_messages(conversation.session_id)
    assert [(m.role, m.text) for m in history.messages] == [
        (pb.ROLE_USER, "Where is my bag?"),
        (pb.ROLE_ASSISTANT, answer1),
        (pb.ROLE_USER, "And my return flight?"),
        (pb.ROLE_ASSISTANT, text_of(second)),
    ]
    session = await client.get_session(conversation.session_id)
    assert session.turn_count == 2
    assert session.message_count == 4
    assert session.metadata.customer_name == "Aroha"


async def test_seq_is_strictly_increasing_across_turns_and_resume(
    server: KoreroServer, client: ChatClient
) -> None:
    conversation = await client.conversation()
    seqs = [conversation.started.seq]
    for i in range(3):
        events = await run_turn(conversation, f"question {i}", f"q{i}")
        assert all(e.session_id == conversation.session_id for e in events)
        assert len({e.turn_id for e in events}) == 1
        seqs += [e.seq for e in events]
    await conversation.close()

    resumed = await client.conversation(session_id=conversation.session_id)
    assert resumed.started.session_started.resumed
    # session_started is not an event of the log: it repeats the last seq (the cursor).
    assert resumed.started.seq == seqs[-1]
    seqs += [e.seq for e in await run_turn(resumed, "after resume", "q9")]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs), "seq must never repeat"
    assert seqs == list(range(len(seqs))), "no gaps: numbering a person can read"
    assert resumed.started.session_started.session.last_seq == resumed.started.seq
    assert (await client.get_session(conversation.session_id)).last_seq == seqs[-1]
    await resumed.close()


async def test_turn_timings_and_usage_are_reported(client: ChatClient) -> None:
    conversation = await client.conversation()
    events = await run_turn(conversation, "How long does a refund take?", "u1")
    usage_events = [e for e in events if e.WhichOneof("kind") == "usage"]
    assert len(usage_events) == 1
    done = events[-1].done
    assert done.usage.output_tokens > 0
    assert done.usage.input_tokens > 0
    assert not done.usage.estimated
    assert done.timings.total.ToNanoseconds() >= done.timings.time_to_first_token.ToNanoseconds()
    assert done.timings.time_to_first_token.ToNanoseconds() > 0


async def test_usage_is_estimated_when_upstream_sends_none(
    client: ChatClient, sim: UpstreamSim
) -> None:
    sim.config = type(sim.config)(send_usage=False)
    conversation = await client.conversation()
    events = await run_turn(conversation, "Hello", "u1")
    done = events[-1].done
    assert done.usage.estimated
    assert done.usage.output_tokens > 0


async def test_first_delta_is_immediate_and_later_deltas_are_coalesced(
    client: ChatClient, sim: UpstreamSim
) -> None:
    # 200 tokens/s = one token every 5 ms; a 20 ms window merges about four.
    sim.config = type(sim.config)(tokens_per_second=200, answer_tokens=60)
    conversation = await client.conversation()
    events = await run_turn(conversation, "Tell me about check-in", "c1")
    deltas = [e.text_delta.text for e in events if e.WhichOneof("kind") == "text_delta"]
    first_token = sim.answer_for(sim.requests[0].body["messages"]).split(" ")[0]
    assert deltas[0].strip() == first_token.strip()  # the first token alone, not merged
    assert len(deltas) < 40  # 60 tokens arrived as far fewer messages
    assert "".join(deltas) == sim.answer_for(sim.requests[0].body["messages"])


async def test_idempotent_retry_returns_the_same_answer_without_calling_the_llm(
    client: ChatClient, sim: UpstreamSim
) -> None:
    conversation = await client.conversation()
    first = await run_turn(conversation, "What is the baggage allowance?", "same-id")
    again = await run_turn(conversation, "What is the baggage allowance?", "same-id")
    assert len(sim.requests) == 1
    assert text_of(again) == text_of(first)
    assert again[0].turn_started.replayed
    assert again[0].turn_id == first[0].turn_id
    assert again[-1].WhichOneof("kind") == "done"
    assert again[0].seq > first[-1].seq
    history = await client.list_messages(conversation.session_id)
    assert len(history.messages) == 2  # stored once


async def test_retry_from_another_stream_joins_the_turn_in_flight(
    client: ChatClient, sim: UpstreamSim
) -> None:
    sim.config = type(sim.config)(ttft=0.3, tokens_per_second=100, answer_tokens=20)
    a = await client.conversation()
    b = await client.conversation(session_id=a.session_id)
    first_task = asyncio.create_task(run_turn(a, "Can I change my seat?", "dup"))
    await sim.wait_for(lambda r: True)
    joined = await run_turn(b, "Can I change my seat?", "dup")
    first = await first_task
    assert len(sim.requests) == 1
    assert text_of(joined) == text_of(first)
    assert len(terminals(joined)) == 1
    assert joined[-1].WhichOneof("kind") == "done"


async def test_resume_unknown_session_is_invalid_argument(client: ChatClient) -> None:
    with pytest.raises(ChatError) as info:
        await client.conversation(session_id="doesnotexist")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.reason == "SESSION_NOT_FOUND"


async def test_get_session_unknown_is_not_found(client: ChatClient) -> None:
    with pytest.raises(ChatError) as info:
        await client.get_session("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.reason == "SESSION_NOT_FOUND"


async def test_list_messages_pages(client: ChatClient) -> None:
    conversation = await client.conversation()
    for i in range(3):
        await run_turn(conversation, f"message {i}", f"p{i}")
    page1 = await client.list_messages(conversation.session_id, page_size=4)
    assert len(page1.messages) == 4
    assert page1.next_page_token
    page2 = await client.list_messages(conversation.session_id, 4, page1.next_page_token)
    assert next(m.text for m in page2.messages) == "message 2"
    assert len(page2.messages) == 2
    assert not page2.next_page_token
    with pytest.raises(ChatError) as info:
        await client.list_messages(conversation.session_id, 4, "garbage!")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_send_message_single_turn_server_streaming(
    server: KoreroServer, sim: UpstreamSim
) -> None:
    async with ChatClient(f"127.0.0.1:{server.port}") as c:
        request = pb.SendMessageRequest(
            metadata=pb.SessionMetadata(customer_name="Mere"),
            message=pb.UserMessage(client_message_id="s1", text="Is my flight on time?"),
        )
        events = [r.event async for r in c.stub.SendMessage(request)]
        assert kinds(events)[0] == "session_started"
        assert kinds(events)[1] == "turn_started"
        assert kinds(events)[-1] == "done"
        session_id = events[0].session_id
        assert "Mere" in text_of(events)
        follow = pb.SendMessageRequest(
            session_id=session_id,
            message=pb.UserMessage(client_message_id="s2", text="Thanks"),
        )
        events2 = [r.event async for r in c.stub.SendMessage(follow)]
        assert kinds(events2)[0] == "turn_started"
        assert events2[0].seq > events[-1].seq
        assert len(sim.requests[1].body["messages"]) == 4

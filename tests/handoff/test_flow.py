"""A full handoff over real servers: escalate, queue, agent joins, relay, back to the bot."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import timedelta

import grpc
import pytest

from korero.agent.v1 import agent_pb2 as apb
from korero.agent.v1 import agent_pb2_grpc
from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.settings import Settings
from tests.handoff.conftest import FAST
from tests.handoff.desk import Agent, notification
from tests.helpers import ingest_sample, kinds, of_kind, run_turn, text_of

COMPLAINT = "This is the third time my bag was lost, I am furious!!"


async def test_complaint_escalates_to_an_agent_and_returns_to_the_bot(start_server, sim) -> None:  # type: ignore[no-untyped-def]
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    agent = Agent(target, "a1", "Mere")
    await agent.connect()
    async with ChatClient(target) as client:
        conversation = await client.conversation(
            metadata=pb.SessionMetadata(customer_name="Aroha", booking_reference="ABC123")
        )
        upstream_before = len(sim.requests)
        events = await run_turn(conversation, COMPLAINT)
        assert kinds(events)[0] == "turn_started"
        started = events[0].turn_started
        assert started.intent == "complaint"
        assert started.sentiment.score < -0.5
        assert "member of our team" in text_of(events)
        requested = [e for e in events if e.WhichOneof("kind") == "handoff_requested"]
        assert requested
        assert requested[0].handoff_requested.trigger == pb.HANDOFF_TRIGGER_COMPLAINT
        assert kinds(events)[-2:] == ["usage", "done"]
        assert len(sim.requests) == upstream_before  # the bot did not ask the model
        handoff_id = requested[0].handoff_requested.handoff_id

        queued = await notification(conversation, "handoff_queued")
        assert queued.handoff_queued.position == 1
        assert queued.handoff_queued.queue == "complaints"
        assert queued.seq > events[-1].seq

        # complaints go to the complaints queue: Mere serves only general
        offered = None
        skilled = Agent(target, "a2", "Tama", skills=["complaints"])
        await skilled.connect()
        offered = await skilled.expect("offered")
        packet = offered.offered.context
        assert packet.handoff_id == handoff_id
        assert packet.customer.customer_name == "Aroha"
        assert packet.trigger == pb.HANDOFF_TRIGGER_COMPLAINT
        assert "complaint" in packet.reason
        assert list(packet.intent_history) == ["complaint"]
        assert packet.sentiment.score < -0.5
        assert "Aroha" in packet.summary
        assert next(m.text for m in packet.transcript) == COMPLAINT
        assert not agent.of_kind("offered")

        # while waiting, the customer's message goes to the desk, not the bot
        relayed = await run_turn(conversation, "Hello? Is anyone there?")
        assert kinds(relayed) == ["message_relayed"]
        assert len(sim.requests) == upstream_before

        await skilled.accept(handoff_id)
        assigned = await skilled.expect("assigned")
        assert [m.text for m in assigned.assigned.context.transcript][
            -1
        ] == "Hello? Is anyone there?"
        joined = await notification(conversation, "agent_joined")
        assert joined.agent_joined.agent_display_name == "Tama"

        await skilled.say(handoff_id, "Kia ora Aroha, I'm Tama. Let me find your bag.")
        said = await notification(conversation, "agent_message")
        assert said.agent_message.text.startswith("Kia ora Aroha")
        assert said.seq > joined.seq
        sent = await skilled.expect("message_sent")
        assert sent.message_sent.seq == said.seq

        reply = await run_turn(conversation, "Thank you, it is a blue suitcase")
        assert kinds(reply) == ["message_relayed"]
        message = await skilled.expect("customer_message")
        assert message.customer_message.text == "Thank you, it is a blue suitcase"
        assert message.customer_message.sentiment.score > 0
        assert len(sim.requests) == upstream_before  # still silent

        await skilled.release(handoff_id)
        ended_desk = await skilled.expect("ended")
        assert ended_desk.ended.outcome == pb.HANDOFF_OUTCOME_RETURNED_TO_BOT
        left = await notification(conversation, "agent_left")
        assert left.agent_left.reason == "handed back"
        ended = await notification(conversation, "handoff_ended")
        assert ended.handoff_ended.outcome == pb.HANDOFF_OUTCOME_RETURNED_TO_BOT

        back = await run_turn(conversation, "How many bags can I check?")
        assert kinds(back)[-1] == "done"
        assert back[0].seq > ended.seq
        assert len(sim.requests) == upstream_before + 1  # the bot answers again

        history = await client.list_messages(conversation.session_id)
        roles = [(m.role, m.agent_display_name) for m in history.messages]
        assert (pb.ROLE_AGENT, "Tama") in roles
        assert history.messages[0].sentiment.score < -0.5
    await agent.close()
    await skilled.close()


async def test_the_context_packet_carries_citations_sentiment_and_the_wait(
    start_server, redis_url
) -> None:  # type: ignore[no-untyped-def]
    await ingest_sample(redis_url)
    # No handoff has been answered yet, so the estimate is the configured default.
    assert Settings.from_env({"KORERO_HANDOFF_DEFAULT_WAIT": "90"}).handoff.default_wait == 90
    app = await start_server(handoff=dataclasses.replace(FAST, default_wait=90.0))
    target = f"127.0.0.1:{app.port}"
    async with ChatClient(target) as client:
        conversation = await client.conversation(metadata=pb.SessionMetadata(customer_name="Aroha"))
        answered = await run_turn(conversation, "What's the checked baggage allowance?")
        cited = list(
            dict.fromkeys(
                (e.citation.document_title, e.citation.section)
                for e in of_kind(answered, "citation")
            )
        )
        assert cited[0] == ("Baggage Policy", "2.1")
        thanked = await run_turn(conversation, "Thanks, that is really helpful, great!")
        asked_at = time.time()
        asked = await run_turn(conversation, "I want to talk to a real person")
        scores = [t[0].turn_started.sentiment.score for t in (answered, thanked, asked)]
        assert scores[1] > 0.5  # the history is not flat
        handoff_id = of_kind(asked, "handoff_requested")[0].handoff_requested.handoff_id

        queued = (await notification(conversation, "handoff_queued")).handoff_queued
        assert queued.position == 1
        assert queued.estimated_wait.ToTimedelta() == timedelta(seconds=90)

        async with grpc.aio.insecure_channel(target) as channel:
            listed = (
                await agent_pb2_grpc.AgentDeskServiceStub(channel).ListQueue(apb.ListQueueRequest())
            ).conversations
        assert len(listed) == 1
        waiting = listed[0]
        assert (waiting.handoff_id, waiting.session_id) == (handoff_id, conversation.session_id)
        assert (waiting.position, waiting.queue, waiting.customer_name) == (1, "general", "Aroha")
        assert waiting.trigger == pb.HANDOFF_TRIGGER_HUMAN_REQUEST
        assert asked_at - 1 <= waiting.request_time.ToNanoseconds() / 1e9 <= time.time()

        await asyncio.sleep(1.0)  # the customer waits a while before anyone comes
        agent = Agent(target, "a1", "Mere")
        await agent.connect()
        packet = (await agent.expect("offered")).offered.context
        assert packet.handoff_id == handoff_id
        assert [(c.document_title, c.section) for c in packet.citations] == cited
        assert "23 kg" in packet.citations[0].snippet
        assert list(packet.sentiment_history) == pytest.approx(scores, abs=1e-3)  # stored rounded
        assert packet.sentiment.score == pytest.approx(scores[-1], abs=1e-3)
        assert packet.sentiment.window == 3
        assert packet.sentiment.trend == pytest.approx(sum(scores) / 3, abs=1e-3)
        intents = [t[0].turn_started.intent for t in (answered, thanked, asked)]
        assert list(packet.intent_history) == [i for i in intents if i]
        assert intents[0] == "policy_question"
        assert intents[-1] == "human_request"
        assert packet.request_time == waiting.request_time
        offered_wait = packet.waited.ToTimedelta().total_seconds()
        assert 1.0 <= offered_wait < 10.0

        await agent.accept(handoff_id)
        assigned = (await agent.expect("assigned")).assigned.context
        assert assigned.request_time == waiting.request_time
        assert offered_wait <= assigned.waited.ToTimedelta().total_seconds() < 10.0
        assert [(c.document_title, c.section) for c in assigned.citations] == cited
    await agent.close()

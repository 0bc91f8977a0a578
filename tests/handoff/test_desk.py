"""The agent desk: two instances, disconnects and graces, fairness, offers, scopes."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import grpc
import pytest

from korero.agent.v1 import agent_pb2 as apb
from korero.agent.v1 import agent_pb2_grpc
from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.handoff.actions import AgentProfile
from korero.server.policy.api_keys import ApiKeyStore
from korero.server.storage.keys import desk_key
from tests.handoff.conftest import FAST
from tests.handoff.desk import Agent, handed_over, notification
from tests.helpers import kinds, redis_client, run_turn

ASK = "I want to talk to a real person"


async def test_customer_and_agent_on_different_instances(start_server, sim) -> None:  # type: ignore[no-untyped-def]
    a = await start_server()
    b = await start_server()
    agent = Agent(f"127.0.0.1:{b.port}", "a1", "Mere")
    await agent.connect()
    async with ChatClient(f"127.0.0.1:{a.port}") as client:
        conversation = await client.conversation()
        await run_turn(conversation, ASK)
        offered = await agent.expect("offered")
        handoff_id = offered.offered.context.handoff_id
        await agent.accept(handoff_id)
        await agent.expect("assigned")
        joined = await notification(conversation, "agent_joined")  # told on instance A
        seqs = [joined.seq]
        for i in range(3):
            await agent.say(handoff_id, f"agent line {i}")
            assert kinds(await run_turn(conversation, f"customer line {i}")) == ["message_relayed"]
        for i in range(3):
            said = await notification(conversation, "agent_message")
            assert said.agent_message.text == f"agent line {i}"
            seqs.append(said.seq)
            got = await agent.expect("customer_message")
            assert got.customer_message.text == f"customer line {i}"
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        await agent.release(handoff_id, close=True, disposition="resolved")
        ended = await notification(conversation, "handoff_ended")
        assert ended.handoff_ended.outcome == pb.HANDOFF_OUTCOME_CLOSED
        assert ended.handoff_ended.disposition == "resolved"
    await agent.close()


async def test_agent_disconnect_loses_nothing_and_reconnects_within_grace(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server(handoff=dataclasses.replace(FAST, agent_grace=5.0))
    target = f"127.0.0.1:{app.port}"
    agent = Agent(target, "a1", "Mere")
    await agent.connect()
    async with ChatClient(target) as client:
        conversation, _ = await handed_over(client, agent)
        await agent.drop()
        left = await notification(conversation, "agent_left")
        assert left.agent_left.reason == "disconnected"
        for i in range(3):  # written while no agent is connected
            assert kinds(await run_turn(conversation, f"while away {i}")) == ["message_relayed"]
        again = Agent(target, "a1", "Mere")
        await again.connect()
        assigned = await again.expect("assigned")
        assert assigned.assigned.resumed
        transcript = [m.text for m in assigned.assigned.context.transcript]
        assert transcript[-3:] == [f"while away {i}" for i in range(3)]
        rejoined = await notification(conversation, "agent_joined")
        assert rejoined.agent_joined.agent_display_name == "Mere"
        assert kinds(await run_turn(conversation, "after return")) == ["message_relayed"]
        await again.expect("customer_message", text="after return")
        assert not again.of_kind("offered")
    await again.close()


async def test_agent_gone_past_grace_returns_the_conversation_to_the_queue(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server()  # grace 1 s
    target = f"127.0.0.1:{app.port}"
    first = Agent(target, "a1", "Mere")
    await first.connect()
    async with ChatClient(target) as client:
        conversation, handoff_id = await handed_over(client, first)
        await run_turn(conversation, "before the drop")
        await first.drop()
        await notification(conversation, "agent_left")
        await run_turn(conversation, "during the drop")
        queued = await notification(conversation, "handoff_queued")  # after the grace
        assert queued.handoff_queued.position == 1
        second = Agent(target, "a2", "Tama")
        await second.connect()
        offered = await second.expect("offered")
        assert offered.offered.context.handoff_id == handoff_id
        texts = [m.text for m in offered.offered.context.transcript]
        assert texts[-2:] == ["before the drop", "during the drop"]
        await second.accept(handoff_id)
        joined = await notification(conversation, "agent_joined")
        assert joined.agent_joined.agent_display_name == "Tama"
    await second.close()


async def test_a_heartbeat_that_lands_after_the_agent_left_does_not_cancel_the_grace(
    start_server, redis_url
) -> None:  # type: ignore[no-untyped-def]
    # The desk's heartbeat task can have a frame on its way when the stream ends; it
    # used to reach Redis after the leave and take the conversation back to `active`
    # for an agent who was gone, so the customer was never put back in the queue.
    app = await start_server(handoff=dataclasses.replace(FAST, agent_grace=1.0))
    target = f"127.0.0.1:{app.port}"
    first = Agent(target, "a1", "Mere")
    await first.connect()
    async with ChatClient(target) as client:
        conversation, handoff_id = await handed_over(client, first)
        redis = redis_client(redis_url)
        raw = await redis.hget(desk_key("default", "agents"), "a1")
        connection = json.loads(raw)["conn"]
        await first.drop()
        await notification(conversation, "agent_left")
        assert app.handoff is not None
        late = await app.handoff.heartbeat("default", AgentProfile("a1", "Mere"), connection)
        assert late is False  # refused: that connection has left
        record = json.loads(await redis.hget(desk_key("default", "handoffs"), handoff_id))
        assert record["state"] == "grace"
        queued = await notification(conversation, "handoff_queued")  # after the grace
        assert queued.handoff_queued.handoff_id == handoff_id
        await redis.aclose()


async def test_offers_are_fair_across_agents(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server(handoff=dataclasses.replace(FAST, offer_timeout=30.0))
    target = f"127.0.0.1:{app.port}"
    agents = [Agent(target, f"a{i}", f"Agent {i}", max_conversations=3) for i in range(2)]
    for agent in agents:
        await agent.connect()
    async with ChatClient(target) as client:
        for _ in range(4):
            conversation = await client.conversation()
            await run_turn(conversation, ASK)
            await asyncio.sleep(0.05)
        for agent in agents:
            for _ in range(2):
                offered = await agent.expect("offered")
                await agent.accept(offered.offered.context.handoff_id)
                await agent.expect("assigned")
    counts = [len(agent.of_kind("assigned")) for agent in agents]
    assert counts == [2, 2]
    for agent in agents:
        await agent.close()


async def test_an_unanswered_offer_goes_to_the_next_agent(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server(handoff=dataclasses.replace(FAST, offer_timeout=1.5))
    target = f"127.0.0.1:{app.port}"
    slow = Agent(target, "a1", "Slow")
    await slow.connect()
    async with ChatClient(target) as client:
        conversation = await client.conversation()
        await run_turn(conversation, ASK)
        handoff_id = (await slow.expect("offered")).offered.context.handoff_id
        quick = Agent(target, "a2", "Quick")
        await quick.connect()
        withdrawn = await slow.expect("offer_withdrawn", timeout=5)
        assert withdrawn.offer_withdrawn.reason in ("expired", "taken")
        offered = await quick.expect("offered", timeout=5)
        assert offered.offered.context.handoff_id == handoff_id
        await quick.decline(handoff_id)
        await quick.expect("offer_withdrawn", reason="declined")
        again = await slow.expect("offered", timeout=5)
        assert again.offered.context.handoff_id == handoff_id
        await slow.accept(handoff_id)
        await slow.expect("assigned")
        queue = (
            await agent_pb2_grpc.AgentDeskServiceStub(slow.channel).ListQueue(
                apb.ListQueueRequest()
            )
        ).conversations
        assert list(queue) == []
    await slow.close()
    await quick.close()


async def test_a_taken_conversation_cannot_be_accepted_twice(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    one, two = Agent(target, "a1", "One"), Agent(target, "a2", "Two", away=True)
    await one.connect()
    await two.connect()
    async with ChatClient(target) as client:
        conversation = await client.conversation()
        await run_turn(conversation, ASK)
        handoff_id = (await one.expect("offered")).offered.context.handoff_id
        await two.accept(handoff_id)
        refused = await two.expect("error")
        assert refused.error.reason == "HANDOFF_NOT_OFFERED"
        await one.accept(handoff_id)
        await one.expect("assigned")
        await two.pick(conversation.session_id)
        taken = await two.expect("error")
        assert taken.error.reason == "HANDOFF_TAKEN"
        await two.say(handoff_id, "sneaky")
        assert (await two.expect("error")).error.reason == "HANDOFF_NOT_YOURS"
    await one.close()
    await two.close()


async def test_the_desk_needs_the_agent_scope(start_server, redis_url) -> None:  # type: ignore[no-untyped-def]
    app = await start_server(auth__mode="on")
    client = redis_client(redis_url)
    keys = ApiKeyStore(client)
    chat_key, _ = await keys.create("t1", "web", ("chat:write", "chat:read"))
    agent_key, _ = await keys.create("t1", "desk", ("agent:write", "agent:read"))
    await client.aclose()
    target = f"127.0.0.1:{app.port}"
    customer_only = Agent(target, "", "X", metadata=[("authorization", f"Bearer {chat_key}")])
    with pytest.raises(AssertionError, match="PERMISSION_DENIED"):
        await customer_only.connect()
    await customer_only.close()
    desk = Agent(target, "ignored", "Mere", metadata=[("authorization", f"Bearer {agent_key}")])
    joined = await desk.connect()
    assert joined.joined.agent_id.startswith("key:")  # the credential names the agent
    await desk.close()
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent_pb2_grpc.AgentDeskServiceStub(channel).ListQueue(
                apb.ListQueueRequest(), metadata=[("authorization", f"Bearer {chat_key}")]
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

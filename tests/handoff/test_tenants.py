"""The desk is per tenant: an agent of one tenant never reaches another tenant's customers."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from korero.agent.v1 import agent_pb2 as apb
from korero.agent.v1 import agent_pb2_grpc
from korero.client import ChatClient, ChatError
from korero.server.policy.api_keys import ApiKeyStore
from tests.handoff.desk import Agent, notification
from tests.helpers import kinds, redis_client, run_turn

ASK = "I want to talk to a real person"
CHAT = ("chat:write", "chat:read")
DESK = ("agent:write", "agent:read")


async def api_keys(redis_url: str, *specs: tuple[str, str, tuple[str, ...]]) -> list[str]:
    """One new API key per (tenant, name, scopes)."""
    redis = redis_client(redis_url)
    try:
        keys = ApiKeyStore(redis)
        return [(await keys.create(tenant, name, scopes))[0] for tenant, name, scopes in specs]
    finally:
        await redis.aclose()


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


async def list_queue(target: str, key: str) -> list[apb.QueuedConversation]:
    async with grpc.aio.insecure_channel(target) as channel:
        response = await agent_pb2_grpc.AgentDeskServiceStub(channel).ListQueue(
            apb.ListQueueRequest(), metadata=bearer(key)
        )
    return list(response.conversations)


async def test_an_agent_of_another_tenant_cannot_see_take_or_write_to_a_conversation(
    start_server, redis_url
) -> None:  # type: ignore[no-untyped-def]
    app = await start_server(auth__mode="on")
    target = f"127.0.0.1:{app.port}"
    t1_chat, t1_desk, t2_desk = await api_keys(
        redis_url, ("t1", "web", CHAT), ("t1", "desk", DESK), ("t2", "desk", DESK)
    )

    # t2's agent is available before t1's customer asks, and stays connected throughout.
    stranger = Agent(target, "", "Stranger", metadata=bearer(t2_desk))
    await stranger.connect()
    async with ChatClient(target, metadata=bearer(t1_chat)) as client:
        conversation = await client.conversation()
        events = await run_turn(conversation, ASK)
        requested = next(e for e in events if e.WhichOneof("kind") == "handoff_requested")
        handoff_id = requested.handoff_requested.handoff_id
        queued = await notification(conversation, "handoff_queued")
        assert queued.handoff_queued.position == 1

        # t1's own desk sees it waiting; t2's sees nothing, and is offered nothing.
        mine = await list_queue(target, t1_desk)
        assert [(c.handoff_id, c.position) for c in mine] == [(handoff_id, 1)]
        assert await list_queue(target, t2_desk) == []
        await asyncio.sleep(1.0)  # ten sweeps: an offer would have been made by now
        assert stranger.of_kind("offered") == []
        assert all(not q.conversations for q in stranger.of_kind("queue"))

        # Taking it by its handoff id or its session id reads as "no such thing":
        # the same answer as for ids that exist nowhere, so nothing leaks.
        await stranger.accept(handoff_id)
        assert (await stranger.expect("error")).error.reason == "HANDOFF_NOT_FOUND"
        await stranger.accept("h_does_not_exist")
        assert (await stranger.expect("error")).error.reason == "HANDOFF_NOT_FOUND"
        await stranger.pick(conversation.session_id)
        assert (await stranger.expect("error")).error.reason == "SESSION_NOT_FOUND"
        await stranger.pick("s_does_not_exist")
        assert (await stranger.expect("error")).error.reason == "SESSION_NOT_FOUND"
        await stranger.decline(handoff_id)
        assert (await stranger.expect("error")).error.reason == "HANDOFF_NOT_OFFERED"
        await stranger.say(handoff_id, "hello from another company")
        refused = (await stranger.expect("error")).error
        assert (refused.reason, refused.handoff_id) == ("HANDOFF_NOT_YOURS", handoff_id)
        await stranger.release(handoff_id, close=True, disposition="stolen")
        assert (await stranger.expect("error")).error.reason == "HANDOFF_NOT_YOURS"

        # Nothing changed for t1's customer: still waiting, still first, no agent, no text.
        with pytest.raises(TimeoutError):
            await conversation.next_notification(0.5)
        assert kinds(await run_turn(conversation, "still there?")) == ["message_relayed"]
        assert [(c.handoff_id, c.position) for c in await list_queue(target, t1_desk)] == [
            (handoff_id, 1)
        ]

        # t1's agent gets it as if nothing had happened, and the customer hears only them.
        desk = Agent(target, "", "Mere", metadata=bearer(t1_desk))
        await desk.connect()
        offered = await desk.expect("offered")
        assert offered.offered.context.handoff_id == handoff_id
        assert [m.text for m in offered.offered.context.transcript][-1] == "still there?"
        await desk.accept(handoff_id)
        await desk.expect("assigned")
        joined = await notification(conversation, "agent_joined")
        assert joined.agent_joined.agent_display_name == "Mere"
        await stranger.say(handoff_id, "still trying")
        assert (await stranger.expect("error")).error.reason == "HANDOFF_NOT_YOURS"
        await desk.say(handoff_id, "Kia ora, I'm Mere.")
        said = await notification(conversation, "agent_message")
        assert said.agent_message.text == "Kia ora, I'm Mere."
        assert kinds(await run_turn(conversation, "thanks")) == ["message_relayed"]
        assert (await desk.expect("customer_message")).customer_message.text == "thanks"
        await asyncio.sleep(0.3)
        assert stranger.of_kind("customer_message") == []
        assert stranger.of_kind("assigned") == []
    await desk.close()
    await stranger.close()


async def test_a_customer_of_another_tenant_cannot_open_the_conversation(
    start_server, redis_url
) -> None:  # type: ignore[no-untyped-def]
    app = await start_server(auth__mode="on")
    target = f"127.0.0.1:{app.port}"
    t1_chat, t2_chat = await api_keys(redis_url, ("t1", "web", CHAT), ("t2", "web", CHAT))
    async with ChatClient(target, metadata=bearer(t1_chat)) as client:
        conversation = await client.conversation()
        await run_turn(conversation, ASK)
        await notification(conversation, "handoff_queued")
    async with ChatClient(target, metadata=bearer(t2_chat)) as other:
        with pytest.raises(ChatError) as refused:
            await other.conversation(conversation.session_id)
        assert refused.value.reason == "SESSION_NOT_FOUND"

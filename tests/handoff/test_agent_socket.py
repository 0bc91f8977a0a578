"""`/ws/agent` with auth on: the gRPC desk's refusals, and a working desk for an agent key."""

from __future__ import annotations

import base64
import json
import secrets

import aiohttp
import pytest

from korero.agent.v1 import agent_pb2 as apb
from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.server.policy.api_keys import ApiKeyStore
from korero.server.transport.agent_socket import AGENT_PATH, JSON_PROTOCOL, PROTO_PROTOCOL
from korero.server.transport.websocket import BEARER_PREFIX
from tests.handoff.desk import Agent
from tests.helpers import redis_client, run_turn

ASK = "I want to talk to a real person"
JOIN = apb.ConnectRequest(join=apb.JoinDesk(agent_id="web", display_name="Mere"))


def agent_url(app: KoreroServer) -> str:
    assert app.websocket is not None
    return f"ws://127.0.0.1:{app.websocket.port}{AGENT_PATH}"


async def receive(ws: aiohttp.ClientWebSocketResponse) -> apb.DeskEvent:
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
    return apb.ConnectResponse.FromString(msg.data).event


async def grpc_refusal(target: str, authorization: str | None) -> ChatError:
    """What the gRPC desk answers the same credential."""
    metadata = [("authorization", authorization)] if authorization else []
    agent = Agent(target, "web", "Mere", metadata=metadata)
    with pytest.raises(AssertionError, match="desk stream ended"):
        await agent.connect()
    await agent.close()
    assert agent.error is not None
    return ChatError.from_rpc_error(agent.error)


async def test_the_agent_socket_refuses_what_the_grpc_desk_refuses_and_admits_an_agent_key(
    start_server, redis_url
) -> None:  # type: ignore[no-untyped-def]
    app = await start_server(auth__mode="on")
    redis = redis_client(redis_url)
    keys = ApiKeyStore(redis)
    chat_key, _ = await keys.create("t1", "web", ("chat:write", "chat:read"))
    agent_key, _ = await keys.create("t1", "desk", ("agent:write", "agent:read"))
    await redis.aclose()
    target = f"127.0.0.1:{app.port}"

    refusals = {
        "no credential": (None, "UNAUTHENTICATED", "CREDENTIALS_MISSING"),
        "not a token": ("Bearer hello", "UNAUTHENTICATED", "CREDENTIALS_INVALID"),
        "unknown key": ("Bearer kr_t1_" + "x" * 43, "UNAUTHENTICATED", "API_KEY_INVALID"),
        "chat-only key": (f"Bearer {chat_key}", "PERMISSION_DENIED", "SCOPE_MISSING"),
    }
    async with aiohttp.ClientSession() as http:
        for case, (authorization, code, reason) in refusals.items():
            over_grpc = await grpc_refusal(target, authorization)
            assert (over_grpc.code.name, over_grpc.reason) == (code, reason), case
            headers = {"Authorization": authorization} if authorization else {}
            async with http.ws_connect(
                agent_url(app), protocols=(PROTO_PROTOCOL,), headers=headers
            ) as ws:
                await ws.send_bytes(JOIN.SerializeToString())
                error = (await receive(ws)).error  # said in-band first ...
                assert (error.code, error.reason) == (over_grpc.code.value[0], reason), case
                msg = await ws.receive(timeout=5)  # ... then closed with a code and reason
                assert msg.type == aiohttp.WSMsgType.CLOSE, case
                assert (ws.close_code, msg.extra) == (1008, f"{code} {reason}"), case

        # A chat-only key in the auth frame (the other way a browser sends it): refused too.
        async with http.ws_connect(agent_url(app), protocols=(JSON_PROTOCOL,)) as ws:
            await ws.send_str(json.dumps({"authorization": f"Bearer {chat_key}"}))
            await ws.send_str(json.dumps({"join": {"agentId": "web", "displayName": "Mere"}}))
            answer = json.loads((await ws.receive(timeout=5)).data)
            assert answer["event"]["error"]["reason"] == "SCOPE_MISSING"
            await ws.receive(timeout=5)
            assert ws.close_code == 1008

        # An agent key as the page sends it (a `korero.bearer.` subprotocol): a working desk
        # of the key's tenant, named by the key, that is offered that tenant's customers.
        token = base64.urlsafe_b64encode(agent_key.encode()).decode().rstrip("=")
        async with http.ws_connect(
            agent_url(app), protocols=(PROTO_PROTOCOL, BEARER_PREFIX + token)
        ) as ws:
            assert ws.protocol == PROTO_PROTOCOL
            await ws.send_bytes(JOIN.SerializeToString())
            joined = (await receive(ws)).joined
            assert joined.agent_id.startswith("key:")
            assert joined.display_name == "Mere"
            async with ChatClient(target, metadata=[("authorization", f"Bearer {chat_key}")]) as c:
                conversation = await c.conversation()
                await run_turn(conversation, ASK)
                while (event := await receive(ws)).WhichOneof("kind") != "offered":
                    pass
                assert event.offered.context.session_id == conversation.session_id


async def test_guessing_keys_on_the_agent_socket_is_throttled_per_address(
    start_server,
) -> None:  # type: ignore[no-untyped-def]
    # As on /ws/chat and over gRPC: after KORERO_AUTH_FAILURES_PER_PEER failed keys from
    # one address, further guesses are refused before the Redis lookup, and told to wait.
    app = await start_server(
        auth__mode="on",
        auth__failures_per_peer=3,
        auth__failures_per_tenant=1000,
        limits__enabled=False,
    )
    refusals = []
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            guess = f"Bearer kr_t1_{secrets.token_urlsafe(32)}"
            async with http.ws_connect(
                agent_url(app), protocols=(PROTO_PROTOCOL,), headers={"Authorization": guess}
            ) as ws:
                await ws.send_bytes(JOIN.SerializeToString())
                reason = (await receive(ws)).error.reason
                msg = await ws.receive(timeout=5)
                refusals.append((reason, ws.close_code, msg.extra))
    assert refusals[:3] == [("API_KEY_INVALID", 1008, "UNAUTHENTICATED API_KEY_INVALID")] * 3
    assert refusals[3:] == [("AUTH_THROTTLED", 1013, "RESOURCE_EXHAUSTED AUTH_THROTTLED")] * 2
    # The address is throttled on the gRPC desk too: one bucket per address.
    over_grpc = await grpc_refusal(
        f"127.0.0.1:{app.port}", f"Bearer kr_t1_{secrets.token_urlsafe(32)}"
    )
    assert over_grpc.reason == "AUTH_THROTTLED"

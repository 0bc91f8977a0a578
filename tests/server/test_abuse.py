"""Abuse: guessed keys, session spam, absurd page tokens, garbage on the WebSocket port."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.server.errors import KoreroError
from korero.server.policy.api_keys import ApiKeyStore
from korero.server.policy.throttle import AuthFailureThrottle, peer_address
from korero.sim import UpstreamSim
from tests.conftest import RedisProcess, make_settings
from tests.helpers import kinds, run_turn

GUESSES = 200


def _bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _apikey_lookups(redis: RedisProcess) -> int:
    stats = redis.client().info("commandstats")
    return int(stats.get("cmdstat_hget", {}).get("calls", 0))


async def test_guessed_api_keys_are_throttled_before_redis_and_a_real_client_is_unaffected(
    redis_proc: RedisProcess, redis_url: str, sim: UpstreamSim
) -> None:
    settings = make_settings(
        redis_url,
        sim.base_url,
        auth__mode="on",
        auth__failures_per_peer=20,
        auth__failures_per_tenant=1000,
        limits__enabled=False,
    )
    app = await KoreroServer.start(settings)
    try:
        key, _ = await ApiKeyStore(app.store.redis).create("acme")
        async with (
            ChatClient(app.address, metadata=_bearer(key)) as real,
            grpc.aio.insecure_channel(app.address) as channel,
        ):
            conversation = await real.conversation()  # the real key verifies once, before
            assert kinds(await run_turn(conversation, "hello", "r0"))[-1] == "done"
            stub = ChatClient(app.address, channel=channel).stub
            lookups = _apikey_lookups(redis_proc)

            async def guess() -> ChatError:
                wrong = f"kr_acme_{secrets.token_urlsafe(32)}"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetSession(
                        pb.GetSessionRequest(session_id=conversation.session_id),
                        metadata=_bearer(wrong),
                    )
                return ChatError.from_rpc_error(info.value)

            async def real_client_calls() -> list[float]:
                took = []
                for i in range(10):
                    started = time.monotonic()
                    session = await real.get_session(conversation.session_id)
                    took.append(time.monotonic() - started)
                    assert session.session_id == conversation.session_id
                    await asyncio.sleep(0.01 * (i % 3))
                return took

            async with asyncio.timeout(20):
                refusals, real_took = await asyncio.gather(
                    asyncio.gather(*(guess() for _ in range(GUESSES))), real_client_calls()
                )
            guessed_lookups = _apikey_lookups(redis_proc) - lookups
            reasons = [r.reason for r in refusals]
            # The first guesses are checked (and fail); then the address is throttled.
            assert reasons.count("API_KEY_INVALID") <= 20
            assert reasons.count("AUTH_THROTTLED") >= GUESSES - 20
            assert set(reasons) == {"API_KEY_INVALID", "AUTH_THROTTLED"}
            throttled = next(r for r in refusals if r.reason == "AUTH_THROTTLED")
            assert throttled.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert throttled.retry_after is not None
            assert throttled.retry_after > 0
            # Throttled guesses cost no Redis lookup (the real client's calls do).
            assert guessed_lookups <= 20 + len(real_took)
            # The real key is known here: never throttled, even from the same address.
            assert kinds(await run_turn(conversation, "still fine?", "r1"))[-1] == "done"
        # The same throttle guards the WebSocket route: a guess there is refused in-band.
        assert app.websocket is not None
        url = f"ws://{app.websocket.address}/ws/chat"
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                url, headers={"Authorization": f"Bearer kr_acme_{secrets.token_urlsafe(32)}"}
            ) as ws,
        ):
            await ws.send_bytes(pb.ChatRequest(start=pb.StartSession()).SerializeToString())
            event = pb.ChatResponse.FromString((await ws.receive(timeout=5)).data).event
            assert event.error.reason == "AUTH_THROTTLED"
            closing = await ws.receive(timeout=5)
            assert closing.data == 1013
    finally:
        await app.shutdown(grace=0)


async def _scraped(app: KoreroServer, name: str) -> dict[str, float]:
    """`name`'s samples on the server's /metrics endpoint, by their `scope` label."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as response,
    ):
        text = await response.text()
    return {
        sample.labels["scope"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


@pytest.mark.parametrize("scope", ["peer", "tenant"])
async def test_throttled_guesses_are_counted_by_the_budget_that_ran_out(
    redis_url: str, sim: UpstreamSim, scope: str
) -> None:
    settings = make_settings(
        redis_url,
        sim.base_url,
        auth__mode="on",
        auth__failures_per_peer=5 if scope == "peer" else 1000,
        auth__failures_per_tenant=5 if scope == "tenant" else 1000,
        limits__enabled=False,
    )
    app = await KoreroServer.start(settings)
    try:
        assert await _scraped(app, "korero_auth_throttled_total") == {}
        reasons = []
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = ChatClient(app.address, channel=channel).stub
            for _ in range(40):
                wrong = f"kr_acme_{secrets.token_urlsafe(32)}"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetSession(
                        pb.GetSessionRequest(session_id="s1"), metadata=_bearer(wrong)
                    )
                reasons.append(ChatError.from_rpc_error(info.value).reason)
        # A guess on the WebSocket route goes through the same gate and is counted too.
        assert app.websocket is not None
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"ws://{app.websocket.address}/ws/chat",
                headers={"Authorization": f"Bearer kr_acme_{secrets.token_urlsafe(32)}"},
            ) as ws,
        ):
            await ws.send_bytes(pb.ChatRequest(start=pb.StartSession()).SerializeToString())
            event = pb.ChatResponse.FromString((await ws.receive(timeout=5)).data).event
            reasons.append(event.error.reason)
        assert reasons[:5] == ["API_KEY_INVALID"] * 5
        throttled = reasons.count("AUTH_THROTTLED")
        assert throttled == len(reasons) - 5
        # What an operator sees: every refusal counted once, under the budget that ran out.
        assert await _scraped(app, "korero_auth_throttled_total") == {scope: float(throttled)}
        assert app.metrics.registry.get_sample_value(
            "korero_auth_throttled_total", {"scope": scope}
        ) == float(throttled)
    finally:
        await app.shutdown(grace=0)


def test_the_throttle_refills_and_tells_how_long_to_wait() -> None:
    now = [0.0]
    throttle = AuthFailureThrottle(per_peer=2, per_tenant=60, clock=lambda: now[0])
    for _ in range(2):
        throttle.check("ipv4:10.0.0.1:5000", "acme")
        throttle.failed("ipv4:10.0.0.1:5000", "acme")
    with pytest.raises(KoreroError) as info:
        throttle.check("ipv4:10.0.0.1:6000", "acme")  # another port, the same address
    assert info.value.reason == "AUTH_THROTTLED"
    assert info.value.retry_after == pytest.approx(30.0)
    throttle.check("ipv4:10.0.0.2:5000", "acme")  # another address passes
    now[0] = 30.0
    throttle.check("ipv4:10.0.0.1:5000", "acme")  # refilled: one more try
    assert peer_address("ipv6:[::1]:443") == "::1"
    assert peer_address("192.168.1.9") == "192.168.1.9"


async def test_send_message_with_bad_input_creates_no_session(
    redis_proc: RedisProcess, server: KoreroServer
) -> None:
    async with ChatClient(server.address) as client:
        for _ in range(50):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _event in client.stub.SendMessage(
                    pb.SendMessageRequest(message=pb.UserMessage(text="hi"))
                ):
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ChatError.from_rpc_error(info.value).reason == "CLIENT_MESSAGE_ID_REQUIRED"
    assert redis_proc.client().keys("kr:{default:*}:meta") == []


@pytest.mark.parametrize("offset", ["100000000000000000000", "9223372036854775808", "201"])
async def test_an_out_of_range_page_token_is_invalid_page_token(
    client: ChatClient, offset: str
) -> None:
    conversation = await client.conversation()
    token = base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()
    with pytest.raises(ChatError) as info:
        await client.list_messages(conversation.session_id, page_token=token)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.reason == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"X" * 4096 + b"\r\n\r\n",
        b"GET /\x00<script> HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n<script>alert(1)</script>\r\n\r\n",
    ],
    ids=["4 KB garbage line", "bad target", "bad header"],
)
async def test_garbage_on_the_websocket_port_gets_a_small_400_that_does_not_echo_it(
    server: KoreroServer, request_bytes: bytes
) -> None:
    assert server.websocket is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.websocket.port)
    try:
        writer.write(request_bytes)
        async with asyncio.timeout(3):
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    assert len(answer) < 512
    assert b"XXXX" not in answer
    assert b"script" not in answer

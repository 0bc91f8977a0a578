"""A burst of session opens against a slow Redis is paced, not failed (policy/pacing.py)."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import grpc
import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.chat.v1 import chat_pb2_grpc
from korero.client import ChatError
from korero.server.app import KoreroServer
from korero.server.errors import KoreroError
from korero.server.policy.pacing import SessionOpenPacer, SessionOpensBusyError
from korero.sim import UpstreamSim
from tests.conftest import RedisProcess, make_settings
from tests.helpers import DelayingProxy

GRPC_OPENS = 120
WS_OPENS = 40
REDIS_DELAY = 0.04  # seconds per Redis reply: one open holds a pooled connection this long
MAX_ATTEMPTS = 60  # per open; each waits at most RetryInfo's delay (<= 10 s, in practice < 1 s)

Outcome = tuple[str, str, float | None]  # ("OK", session id, None) or (code, reason, retry)


async def _open_grpc(stub: chat_pb2_grpc.ChatServiceStub) -> tuple[Outcome, object]:
    """One Chat stream's open: its `session_started`, or the status that refused it."""
    call = stub.Chat()
    try:
        await call.write(pb.ChatRequest(start=pb.StartSession()))
        response = await call.read()
        assert response is not grpc.aio.EOF
        assert response.event.WhichOneof("kind") == "session_started"
        return ("OK", response.event.session_id, None), call
    except grpc.aio.AioRpcError as exc:
        error = ChatError.from_rpc_error(exc)
        return (error.code.name, error.reason, error.retry_after), None


async def _open_ws(http: aiohttp.ClientSession, url: str) -> tuple[Outcome, object]:
    """The same over the WebSocket route: refused in-band, then closed with 1013."""
    ws = await http.ws_connect(url)
    await ws.send_bytes(pb.ChatRequest(start=pb.StartSession()).SerializeToString())
    event = pb.ChatResponse.FromString((await ws.receive(timeout=10)).data).event
    if event.WhichOneof("kind") == "session_started":
        return ("OK", event.session_id, None), ws
    closing = await ws.receive(timeout=10)
    assert closing.data == 1013  # try again later
    await ws.close()
    error = ChatError.from_event(event.error)
    return (error.code.name, error.reason, error.retry_after), None


@pytest.mark.standalone_redis  # delays one server's socket
async def test_a_burst_of_opens_on_a_slow_redis_is_paced_and_every_refusal_says_when_to_retry(
    redis_proc: RedisProcess, redis_url: str, sim: UpstreamSim
) -> None:
    proxy = DelayingProxy(redis_proc.port, delay=lambda: REDIS_DELAY)
    await proxy.start()
    # Four pooled connections at 40 ms a round trip open about 100 sessions a second:
    # 160 at once would wait up to 1.6 s for a connection, past the 1 s Redis timeout.
    settings = make_settings(
        f"redis://127.0.0.1:{proxy.port}/0",
        sim.base_url,
        redis__max_connections=4,
        redis__timeout=1.0,
        server__opens_in_flight=4,
        server__opens_queue=8,
        limits__enabled=False,  # the tenant call limit is a Redis round trip of its own
    )
    app = await KoreroServer.start(settings)
    held: list[object] = []
    try:
        assert app.websocket is not None
        url = f"ws://{app.websocket.address}/ws/chat"
        async with (
            grpc.aio.insecure_channel(app.address) as channel,
            aiohttp.ClientSession() as http,
        ):
            stub = chat_pb2_grpc.ChatServiceStub(channel)

            async def open_one(over_ws: bool) -> Outcome:
                outcome, stream = await (_open_ws(http, url) if over_ws else _open_grpc(stub))
                if stream is not None:
                    held.append(stream)
                return outcome

            async with asyncio.timeout(30):
                first = await asyncio.gather(
                    *(open_one(False) for _ in range(GRPC_OPENS)),
                    *(open_one(True) for _ in range(WS_OPENS)),
                )
            refused = [o for o in first if o[0] != "OK"]
            # Every open either opened or was refused as busy, with a delay: never
            # STORE_UNAVAILABLE (a pool timeout), UNAVAILABLE or INTERNAL.
            assert {(code, reason) for code, reason, _ in refused} <= {
                ("RESOURCE_EXHAUSTED", "SESSION_OPENS_BUSY")
            }, Counter((c, r) for c, r, _ in refused)
            assert all(retry is not None and 0 < retry <= 10 for _, _, retry in refused)
            assert refused, "the burst never filled the queue: the test proves nothing"
            assert len(first) - len(refused) >= 12  # in flight + queued got through
            # Both transports open through the one pacer: both saw refusals.
            assert any(o[0] != "OK" for o in first[GRPC_OPENS:])
            assert any(o[0] != "OK" for o in first[:GRPC_OPENS])

            # A client that waits as RetryInfo says opens in the end, every one of them.
            async def retry_until_open(over_ws: bool, outcome: Outcome) -> tuple[Outcome, int]:
                attempts = 0
                while outcome[0] != "OK" and attempts < MAX_ATTEMPTS:
                    assert outcome[:2] == ("RESOURCE_EXHAUSTED", "SESSION_OPENS_BUSY"), outcome
                    assert outcome[2] is not None
                    await asyncio.sleep(outcome[2])
                    outcome = await open_one(over_ws)
                    attempts += 1
                return outcome, attempts

            async with asyncio.timeout(60):
                final = await asyncio.gather(
                    *(retry_until_open(i >= GRPC_OPENS, outcome) for i, outcome in enumerate(first))
                )
            assert [o for (o, _) in final if o[0] != "OK"] == []
            session_ids = {o[1] for (o, _) in final}
            assert len(session_ids) == GRPC_OPENS + WS_OPENS
            assert sum(attempts for _, attempts in final) >= len(refused)
            # The opens were real: the sessions exist.
            some = next(iter(session_ids))
            assert (await app.engine.get_session(settings.engine.tenant, some)).session_id == some
    finally:
        for stream in held:
            if isinstance(stream, aiohttp.ClientWebSocketResponse):
                await stream.close()
            else:
                stream.cancel()  # type: ignore[attr-defined]
        await app.shutdown(grace=0)
        await proxy.stop()


async def test_the_pacer_queues_in_order_refuses_past_its_bound_and_passes_places_on() -> None:
    pacer = SessionOpenPacer(in_flight=2, queue=2, max_wait=5.0)
    release = asyncio.Event()
    order: list[int] = []

    async def open_one(i: int) -> None:
        async with pacer.slot():
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(open_one(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert (pacer.running, pacer.waiting) == (2, 2)
    with pytest.raises(SessionOpensBusyError) as info:
        async with pacer.slot():
            pass
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.reason == "SESSION_OPENS_BUSY"
    assert info.value.why == "queue_full"
    assert info.value.retry_after is not None
    assert 0.05 <= info.value.retry_after <= 10
    tasks[2].cancel()  # a waiter whose client went away leaves the queue
    await asyncio.sleep(0.01)
    assert pacer.waiting == 1
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3]
    assert (pacer.running, pacer.waiting) == (0, 0)


async def test_an_open_waits_in_the_queue_at_most_max_wait() -> None:
    refused: list[str] = []
    pacer = SessionOpenPacer(in_flight=1, queue=4, max_wait=0.05, on_refused=refused.append)
    hold = asyncio.Event()

    async def stuck() -> None:
        async with pacer.slot():
            await hold.wait()

    task = asyncio.create_task(stuck())
    await asyncio.sleep(0.01)
    started = asyncio.get_running_loop().time()
    with pytest.raises(KoreroError) as info:
        async with pacer.slot():
            pass
    assert 0.04 <= asyncio.get_running_loop().time() - started < 1.0
    assert info.value.reason == "SESSION_OPENS_BUSY"
    assert refused == ["waited_too_long"]
    assert pacer.waiting == 0
    hold.set()
    await task
    async with pacer.slot():  # the place is free again
        assert pacer.running == 1
    assert pacer.running == 0

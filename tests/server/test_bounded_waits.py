"""Waits with a bound: a stall mid-answer, the client's deadline, a client that does not read."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import time
from pathlib import Path

import grpc
import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.server.transport.outbound import OutboundQueue
from korero.sim import Fault, SimConfig, UpstreamSim
from tests.conftest import make_settings
from tests.helpers import kinds, run_turn, terminals, text_of

# A stall after the first token -------------------------------------------------------


async def test_a_stall_after_the_first_token_ends_with_inter_token_timeout(
    redis_url: str, sim: UpstreamSim
) -> None:
    settings = make_settings(redis_url, sim.base_url, llm__inter_token_timeout=0.5)
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            sim.inject(Fault("stall", after_tokens=3, stall_seconds=60))
            started = time.monotonic()
            async with asyncio.timeout(5):
                events = await run_turn(conversation, "Tell me everything", "s1")
            took = time.monotonic() - started
            assert text_of(events)  # it had begun
            assert len(terminals(events)) == 1
            error = events[-1].error
            assert error.reason == "INTER_TOKEN_TIMEOUT"
            assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert error.retryable
            assert took < 2.5, f"the stalled answer ended after {took:.1f}s"
            # The upstream request is closed, not retried, and the session lives on.
            await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=3)
            assert len(sim.requests) == 1
            assert kinds(await run_turn(conversation, "And now?", "s2"))[-1] == "done"
    finally:
        await app.shutdown(grace=0)


# The client's deadline ------------------------------------------------------------------

# Deadlines across the 1-30 s range, including values just past a unit of
# grpc-timeout's rounding (10 ms below 10 s, 100 ms above), where the server's
# view of the deadline is latest.
DEADLINES = (1.0, 1.501, 2.0, 3.0, 4.999, 7.5, 9.991, 10.001, 10.05, 12.345, 15.001, 19.901)
DEADLINES += (20.0, 22.222, 25.55, 27.101, 29.901, 30.0)


@pytest.mark.slow
async def test_the_terminal_event_arrives_before_the_deadline_for_every_deadline(
    redis_url: str, sim: UpstreamSim
) -> None:
    settings = make_settings(
        redis_url,
        sim.base_url,
        llm__first_token_timeout=120.0,
        limits__enabled=False,
    )
    app = await KoreroServer.start(settings)
    sim.inject(Fault("stall", count=len(DEADLINES), after_tokens=0, stall_seconds=120))

    async def one(client: ChatClient, deadline: float) -> tuple[float, str]:
        conversation = await client.conversation(stream_timeout=deadline)
        try:
            events = await run_turn(conversation, f"deadline {deadline}", "d1")
        except ChatError as error:  # a bare status: the turn's end was not heard
            return deadline, f"status {error.code.name}"
        return deadline, events[-1].error.reason or kinds(events)[-1]

    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            async with asyncio.timeout(max(DEADLINES) + 10):
                results = await asyncio.gather(*(one(client, d) for d in DEADLINES))
        missed = [(d, how) for d, how in results if how != "TURN_DEADLINE_EXCEEDED"]
        assert not missed, f"turns that did not end in-band before the deadline: {missed}"
    finally:
        await app.shutdown(grace=0)


# A client that does not read --------------------------------------------------------------


def _delta(seq: int, text: str, turn: str = "t1") -> pb.Event:
    return pb.Event(turn_id=turn, seq=seq, text_delta=pb.TextDelta(text=text))


async def test_the_outbound_queue_merges_deltas_then_overflows() -> None:
    overflows: list[bool] = []
    queue: OutboundQueue[str] = OutboundQueue(4, 200, on_overflow=lambda: overflows.append(True))
    queue.put(pb.Event(seq=1, turn_started=pb.TurnStarted()))
    published = [_delta(seq, f"w{seq} ") for seq in range(2, 12)]
    for event in published:
        queue.put(event)
    queue.put("signal")  # control signals are not events: never merged or counted
    assert len(queue) == 3
    first, merged, signal = [await queue.get() for _ in range(3)]
    assert isinstance(first, pb.Event)
    assert first.WhichOneof("kind") == "turn_started"
    assert isinstance(merged, pb.Event)
    assert merged.text_delta.text == "".join(e.text_delta.text for e in published)
    assert merged.seq == 11  # the latest seq: numbering only goes up
    assert published[0].text_delta.text == "w2 "  # the turn's own events are untouched
    assert signal == "signal"
    # Deltas of another turn are not merged; past either bound the queue gives up.
    queue.put(_delta(12, "x" * 100, turn="t2"))
    queue.put(pb.Event(seq=13, usage=pb.Usage()))
    queue.put(_delta(14, "y" * 120, turn="t2"))  # 3 events, but over 200 bytes
    assert overflows == [True]
    assert queue.overflowed
    assert len(queue) == 0
    assert queue.queued_bytes == 0
    queue.put(_delta(15, "late"))
    assert await queue.get() is None


@pytest.mark.parametrize("method", ["Chat", "SendMessage"])
async def test_a_stream_whose_client_stops_reading_ends_with_resource_exhausted(
    redis_url: str, sim: UpstreamSim, method: str
) -> None:
    sim.config = SimConfig(answer_tokens=40_000)  # ~250 KB, as fast as it goes
    settings = make_settings(
        redis_url,
        sim.base_url,
        llm__max_tokens=40_000,
        server__stream_queue_events=16,
        server__stream_queue_bytes=16 * 1024,
        limits__enabled=False,
        cache__enabled=False,
    )
    app = await KoreroServer.start(settings)
    try:
        # No BDP probing: the client's HTTP/2 window stays at 64 KiB, so the
        # server's writes block once it is full and events start to queue.
        options = [("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=options) as channel:
            stub = ChatClient(app.address, channel=channel).stub
            message = pb.UserMessage(client_message_id="n1", text="Everything")
            if method == "Chat":
                call = stub.Chat()
                await call.write(pb.ChatRequest(start=pb.StartSession()))
                session_id = (await call.read()).event.session_id  # then nothing is read
                await call.write(pb.ChatRequest(message=message))
            else:
                client = ChatClient(app.address, channel=channel)
                session_id = (await client.conversation()).session_id
                call = stub.SendMessage(
                    pb.SendMessageRequest(session_id=session_id, message=message)
                )
            # The server gives up on the stream and stops its turn at once.
            await sim.wait_for(lambda r: True)
            async with asyncio.timeout(10):
                while app.engine.active_turns:
                    await asyncio.sleep(0.05)
            stored = await app.store.turn_state("default", session_id, "n1")
            assert stored.record is not None
            assert (stored.record.status, stored.record.finish_reason) == (
                "failed",
                "STREAM_QUEUE_FULL",
            )
            received: list[pb.Event] = []

            async def read_all() -> None:
                async with asyncio.timeout(10):
                    while (response := await call.read()) is not grpc.aio.EOF:
                        received.append(response.event)

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_all()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ChatError.from_rpc_error(info.value).reason == "STREAM_QUEUE_FULL"
        assert received
        assert all(e.WhichOneof("kind") != "done" for e in received)
        seqs = [e.seq for e in received]
        assert seqs == sorted(set(seqs))  # merged deltas skip numbers, never repeat them
        async with asyncio.timeout(5):  # once the client read it all, nothing is held
            while app.metrics.registry.get_sample_value("korero_active_streams"):
                await asyncio.sleep(0.05)
    finally:
        await app.shutdown(grace=0)


class _RawWebSocket:
    """A WebSocket client on a bare socket, so that nothing reads it unless the test
    does (aiohttp's client reads ahead into its own buffer). Its kernel buffer and
    segment size are small, as a stalled client's window is: the server's writes
    block after a few hundred KB instead of megabytes (loopback's defaults)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    @classmethod
    async def connect(cls, port: int, path: str) -> _RawWebSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        handshake = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, handshake.encode())
        ws = cls(sock)
        while b"\r\n\r\n" not in ws._buffer:
            await ws._fill()
        head, _, ws._buffer = ws._buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return ws

    async def _fill(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self._sock, 65536)
        if not data:
            raise ConnectionError("the server closed the connection without a close frame")
        self._buffer += data

    async def _take(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    async def send(self, request: pb.ChatRequest) -> None:
        await self._send(0x2, request.SerializeToString())

    async def send_close(self, code: int) -> None:
        """Answer the server's close frame, as a browser does."""
        await self._send(0x8, struct.pack("!H", code))

    async def _send(self, opcode: int, payload: bytes) -> None:
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frame = bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked  # final, masked
        await asyncio.get_running_loop().sock_sendall(self._sock, frame)

    async def receive(self) -> pb.Event | tuple[int, str]:
        """The next event, or a close frame's (code, reason)."""
        first, second = await self._take(2)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._take(8))
        payload = await self._take(n)
        if first & 0x0F == 0x8:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
        assert first & 0x0F == 0x2, first
        return pb.ChatResponse.FromString(payload).event

    def close(self) -> None:
        self._sock.close()


def _server_connections(port: int) -> int:
    """TCP connections this process holds on local `port`, the listener aside (the
    server runs in the test's process; its clients' sockets have other local ports)."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                held.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            listening = state == "0A"
            if int(local.rsplit(":", 1)[1], 16) == port and not listening and inode in held:
                count += 1
    return count


@pytest.mark.parametrize("reads_again", [True, False], ids=["reads-again", "never-reads"])
async def test_a_socket_whose_client_stops_reading_closes_with_1013(
    redis_url: str, sim: UpstreamSim, reads_again: bool
) -> None:
    sim.config = SimConfig(answer_tokens=100_000)  # ~600 KB, as fast as it goes
    settings = make_settings(
        redis_url,
        sim.base_url,
        llm__max_tokens=100_000,
        server__stream_queue_events=16,
        server__stream_queue_bytes=16 * 1024,
        limits__enabled=False,
        cache__enabled=False,
    )
    app = await KoreroServer.start(settings)
    ws: _RawWebSocket | None = None
    try:
        assert app.websocket is not None
        ws = await _RawWebSocket.connect(app.websocket.port, "/ws/chat")
        await ws.send(pb.ChatRequest(start=pb.StartSession()))
        started = await ws.receive()
        assert isinstance(started, pb.Event)
        session_id = started.session_id
        message = pb.UserMessage(client_message_id="n1", text="Everything")
        await ws.send(pb.ChatRequest(message=message))
        # Then nothing is read: the server gives up on the socket and stops the turn.
        await sim.wait_for(lambda r: True)
        async with asyncio.timeout(15):
            while app.engine.active_turns:
                await asyncio.sleep(0.05)
        stopped = time.monotonic()
        stored = await app.store.turn_state("default", session_id, "n1")
        assert stored.record is not None
        assert (stored.record.status, stored.record.finish_reason) == (
            "failed",
            "STREAM_QUEUE_FULL",
        )
        if reads_again:
            # The client reads again: the events already on the wire, then the close.
            received: list[pb.Event] = []
            async with asyncio.timeout(10):
                while isinstance(item := await ws.receive(), pb.Event):
                    received.append(item)
            assert item == (1013, "RESOURCE_EXHAUSTED STREAM_QUEUE_FULL")
            await ws.send_close(1013)
            assert received
            # No in-band error (it would sit behind what the client is not reading), no done.
            assert {e.WhichOneof("kind") for e in received} <= {
                "rate_limit",
                "turn_started",
                "text_delta",
            }
            seqs = [e.seq for e in received]
            assert seqs == sorted(set(seqs))  # merged deltas skip numbers, never repeat them
        # Either way the server lets go of the connection within a bound (the close
        # frame waits at most a second behind what the client has not read), not when
        # a client that stopped reading finally goes away.
        async with asyncio.timeout(5):
            while _server_connections(app.websocket.port) or app.websocket.open_sockets:
                await asyncio.sleep(0.1)
        assert time.monotonic() - stopped < 3
    finally:
        if ws is not None:
            ws.close()
        await app.shutdown(grace=0)

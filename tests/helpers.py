"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import redis.asyncio as aioredis

from korero.chat.v1 import chat_pb2 as pb
from korero.client import Conversation
from korero.server.context.knowledge import KnowledgeStore, load_documents
from korero.server.settings import RedisSettings
from korero.server.storage.connection import connect


async def run_turn(
    conversation: Conversation, text: str, cmid: str | None = None
) -> list[pb.Event]:
    """All events of one turn, terminal last."""
    return [event async for event in conversation.send(text, cmid)]


def kinds(events: list[pb.Event]) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in events]


def text_of(events: list[pb.Event]) -> str:
    return "".join(e.text_delta.text for e in events if e.WhichOneof("kind") == "text_delta")


def terminals(events: list[pb.Event]) -> list[pb.Event]:
    return [e for e in events if e.WhichOneof("kind") in ("done", "error")]


SAMPLE_KB = Path(__file__).resolve().parent.parent / "kb" / "sample"


def redis_client(redis_url: str) -> aioredis.Redis:
    """An asyncio client for `redis_url`: one server or a `redis+cluster://` cluster."""
    return connect(RedisSettings(url=redis_url, timeout=5.0))


async def ingest_sample(redis_url: str, tenant: str = "default") -> int:
    """Ingest the sample knowledge base for `tenant`; returns the KB version."""
    client = redis_client(redis_url)
    try:
        return await KnowledgeStore(client).ingest(tenant, load_documents(SAMPLE_KB))
    finally:
        await client.aclose()


def of_kind(events: list[pb.Event], kind: str) -> list[pb.Event]:
    return [e for e in events if e.WhichOneof("kind") == kind]


class RawH2Client:
    """A bare HTTP/2 client (the `h2` package): frames exactly as written, no gRPC library.

    `call` sends one POST with `body` (END_STREAM after it, unless `end` is
    False) and returns the response's headers and trailers merged, or None if
    nothing ended the stream within `timeout` seconds. Several calls may be in
    flight on one connection.
    """

    def __init__(self, port: int, content_type: str = "application/grpc") -> None:
        self.port = port
        self.content_type = content_type
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None
        self._ends: dict[int, asyncio.Future[dict[str, str]]] = {}
        self._headers: dict[int, dict[str, str]] = {}

    async def __aenter__(self) -> RawH2Client:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._conn.initiate_connection()
        self._flush()
        self._pump = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if self._writer is not None:
            self._writer.close()

    def _flush(self) -> None:
        assert self._writer is not None
        self._writer.write(self._conn.data_to_send())

    async def _read(self) -> None:
        assert self._reader is not None
        while data := await self._reader.read(65536):
            for event in self._conn.receive_data(data):
                sid = getattr(event, "stream_id", 0)
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    self._headers.setdefault(sid, {}).update(
                        (k.decode(), v.decode()) for k, v in event.headers
                    )
                elif isinstance(event, h2.events.DataReceived):
                    self._conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = self._ends.pop(sid, None)
                    if done is not None and not done.done():
                        done.set_result(self._headers.pop(sid, {}))
            self._flush()

    def start(self, path: str, body: bytes, *, end: bool = True) -> asyncio.Future[dict[str, str]]:
        """Send a request; the future ends with its headers and trailers."""
        sid = self._conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{self.port}"),
            ("content-type", self.content_type),
            ("te", "trailers"),
        ]
        self._conn.send_headers(sid, headers, end_stream=end and not body)
        if body:
            self._conn.send_data(sid, body, end_stream=end)
        self._ends[sid] = asyncio.get_running_loop().create_future()
        self._flush()
        return self._ends[sid]

    async def call(
        self, path: str, body: bytes, *, end: bool = True, timeout: float = 5.0
    ) -> dict[str, str] | None:
        try:
            return await asyncio.wait_for(self.start(path, body, end=end), timeout)
        except TimeoutError:
            return None


class RawChat:
    """A `Chat` stream on the generated stub, for frames the client would never send."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.session_id = ""

    @classmethod
    async def open(cls, stub: Any) -> RawChat:
        chat = cls(stub.Chat())
        await chat.call.write(pb.ChatRequest(start=pb.StartSession()))
        chat.session_id = (await chat.next_event()).session_id
        return chat

    async def write(self, request: pb.ChatRequest) -> None:
        await self.call.write(request)

    async def next_event(self, timeout: float = 5.0) -> pb.Event:
        """The next event that is not a heartbeat."""
        while True:
            response = await asyncio.wait_for(self.call.read(), timeout)
            if response.event.WhichOneof("kind") != "heartbeat":
                return response.event  # type: ignore[no-any-return]

    async def turn(self, text: str, cmid: str) -> list[pb.Event]:
        """Send a message and collect events up to its turn's terminal one."""
        await self.write(pb.ChatRequest(message=pb.UserMessage(client_message_id=cmid, text=text)))
        events = []
        while True:
            event = await self.next_event()
            events.append(event)
            if event.WhichOneof("kind") in ("done", "error") and event.turn_id:
                return events

    def close(self) -> None:
        self.call.cancel()


class DelayingProxy:
    """A TCP proxy (to Redis) that delays every reply chunk: by `delay()` seconds,
    a random few ms unless told otherwise."""

    def __init__(
        self, upstream_port: int, delay: Callable[[], float] = lambda: random.uniform(0, 0.01)
    ) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: bool) -> None:
            try:
                while data := await src.read(65536):
                    if delay:
                        await asyncio.sleep(self.delay())
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

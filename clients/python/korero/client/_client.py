"""An async client for `korero.chat.v1.ChatService`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.chat.v1 import chat_pb2_grpc
from korero.client._errors import ChatError

__all__ = ["ChatClient", "Conversation"]

_TERMINAL = frozenset({"done", "error"})
SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"
_CLOSED = object()


class Conversation:
    """One `Chat` stream: one session, many turns, one at a time."""

    def __init__(self, call: Any, started: pb.Event) -> None:
        self._call = call
        self.started = started
        self.session_id = started.session_id
        self.last_seq = started.seq
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self._error: ChatError | None = None
        self._goaway: ChatError | None = None

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    break
                event = response.event
                if not event.turn_id and event.error.reason == SHUTTING_DOWN:
                    # The server's in-band notice that it is ending the stream.
                    self._goaway = ChatError.from_event(event.error)
                    continue
                self._queue.put_nowait(event)
        except grpc.aio.AioRpcError as error:
            self._error = self._goaway or ChatError.from_rpc_error(error)
        except asyncio.CancelledError:
            pass
        self._queue.put_nowait(_CLOSED)

    async def send(
        self, text: str, client_message_id: str | None = None
    ) -> AsyncIterator[pb.Event]:
        """Send a user message and yield its turn's events, ending with the terminal one.

        Heartbeats are skipped. Raises `ChatError` if the stream ends first.
        """
        cmid = client_message_id or uuid.uuid4().hex
        await self._write(pb.ChatRequest(message=pb.UserMessage(client_message_id=cmid, text=text)))
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                self._queue.put_nowait(_CLOSED)
                raise self._error or ChatError(
                    grpc.StatusCode.UNAVAILABLE, "the stream ended before the turn did"
                )
            event: pb.Event = item
            self.last_seq = max(self.last_seq, event.seq)
            kind = event.WhichOneof("kind")
            if kind == "heartbeat":
                continue
            yield event
            if kind in _TERMINAL and (event.turn_id or event.error.client_message_id in ("", cmid)):
                return

    async def cancel(self, turn_id: str = "") -> None:
        """Cancel the turn in flight (or the named one)."""
        await self._write(pb.ChatRequest(cancel=pb.CancelTurn(turn_id=turn_id)))

    async def _write(self, request: pb.ChatRequest) -> None:
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            # The stream ended under us. The status the server ended it with
            # arrives on the read side; a failed write only says "it's gone".
            await asyncio.wait({self._reader}, timeout=5.0)
            if self._error is not None:
                raise self._error from None
            if isinstance(error, grpc.aio.AioRpcError):
                raise ChatError.from_rpc_error(error) from None
            raise ChatError(grpc.StatusCode.UNAVAILABLE, "the stream has ended") from None

    async def close(self) -> None:
        """Half-close and wait for the server to end the stream."""
        try:
            await self._call.done_writing()
            await asyncio.wait_for(self._reader, timeout=5.0)
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
            self._call.cancel()
            self._reader.cancel()


class ChatClient:
    """A channel to a Kōrero server.

        async with ChatClient("127.0.0.1:50051") as client:
            async for event in client.send("Where is my bag?"):
                ...

    `send` opens a conversation on first use; `conversation()` opens more.
    Every gRPC failure surfaces as `ChatError`.

    `credentials` (`grpc.ssl_channel_credentials(...)`) makes the channel TLS;
    `options` are channel arguments. grpcio shares one connection between
    channels to the same target; `("grpc.use_local_subchannel_pool", 1)`
    gives this client its own, which is how a load test spreads over the
    worker processes of `korero serve --workers N`.
    """

    def __init__(
        self,
        target: str,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self._metadata = tuple(metadata)
        if channel is None:
            channel = (
                grpc.aio.secure_channel(target, credentials, options=list(options))
                if credentials is not None
                else grpc.aio.insecure_channel(target, options=list(options))
            )
        self._channel = channel
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._default: Conversation | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._default is not None:
            await self._default.close()
        await self._channel.close()

    @property
    def stub(self) -> chat_pb2_grpc.ChatServiceStub:
        return self._stub

    async def conversation(
        self,
        session_id: str = "",
        metadata: pb.SessionMetadata | None = None,
        stream_timeout: float | None = None,
    ) -> Conversation:
        """Open a Chat stream, starting a new session or resuming `session_id`.

        `stream_timeout` becomes the gRPC deadline of the whole stream.
        """
        call = self._stub.Chat(metadata=self._metadata, timeout=stream_timeout)
        try:
            await call.write(
                pb.ChatRequest(start=pb.StartSession(session_id=session_id, metadata=metadata))
            )
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            raise ChatError.from_rpc_error(error) from None
        if first is grpc.aio.EOF:
            raise ChatError(grpc.StatusCode.UNAVAILABLE, "the server closed the stream")
        return Conversation(call, first.event)

    async def send(
        self, text: str, client_message_id: str | None = None
    ) -> AsyncIterator[pb.Event]:
        """Send on the default conversation (opened on first use)."""
        if self._default is None:
            self._default = await self.conversation()
        async for event in self._default.send(text, client_message_id):
            yield event

    async def get_session(self, session_id: str) -> pb.Session:
        try:
            response = await self._stub.GetSession(
                pb.GetSessionRequest(session_id=session_id), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise ChatError.from_rpc_error(error) from None
        session: pb.Session = response.session
        return session

    async def list_messages(
        self, session_id: str, page_size: int = 0, page_token: str = ""
    ) -> pb.ListMessagesResponse:
        try:
            response: pb.ListMessagesResponse = await self._stub.ListMessages(
                pb.ListMessagesRequest(
                    session_id=session_id, page_size=page_size, page_token=page_token
                ),
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise ChatError.from_rpc_error(error) from None
        return response

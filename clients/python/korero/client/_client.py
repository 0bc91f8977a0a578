"""An async client for `korero.chat.v1.ChatService`."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.chat.v1 import chat_pb2_grpc
from korero.client._errors import ChatError
from korero.client._retry import DEFAULT_RECONNECT, Reconnect

__all__ = ["ChatClient", "Conversation"]

_TERMINAL = frozenset({"done", "error"})
_SESSION_KINDS = frozenset(
    {
        "handoff_requested",
        "handoff_queued",
        "agent_joined",
        "agent_message",
        "agent_left",
        "handoff_ended",
    }
)
"""Events about the conversation rather than one message: see `Conversation.notifications`."""
SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"
_CLOSED = object()
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class Conversation:
    """One session over a `Chat` stream: many turns, one at a time.

    With `reconnect` set (the default), a broken stream is reopened with the
    last seq received as the resume cursor: the server replays what was missed
    and the turn in flight goes on, so `send()` keeps yielding its events as
    if nothing happened. A message the server never received is sent again
    with the same `client_message_id` (idempotent: never a second answer).
    """

    def __init__(
        self,
        client: ChatClient,
        call: Any,
        started: pb.Event,
        *,
        reconnect: Reconnect | None,
        stream_timeout: float | None,
    ) -> None:
        self._client = client
        self._call = call
        self.started = started
        self.session_id = started.session_id
        self.last_seq = started.seq
        self.reconnects = 0
        """How many times the stream was reopened."""
        self._reconnect = reconnect
        self._timeout = stream_timeout
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.notifications: asyncio.Queue[pb.Event] = asyncio.Queue()
        """Handoff events and agent messages that belong to no turn, in seq order."""
        self._error: ChatError | None = None
        self._goaway: ChatError | None = None
        self._closing = False
        self._pending: tuple[str, str] | None = None  # the message whose turn is awaited
        self._started_seen = False  # its turn_started arrived
        self._replay_through: int | None = None
        self._rng = random.Random()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            error = await self._pump()
            if error is None or self._closing:
                break
            if self._reconnect is None or not self._reconnect.worth_retrying(error):
                self._error = error
                break
            try:
                await self._reopen(error)
            except ChatError as final:
                self._error = final
                break
        self._queue.put_nowait(_CLOSED)

    async def _pump(self) -> ChatError | None:
        """Read the current call until it ends; the error it ended with (None: ended cleanly)."""
        self._goaway = None
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    return self._goaway  # a clean end after a goodbye is still a break
                self._take(response.event)
        except grpc.aio.AioRpcError as error:
            return self._goaway or ChatError.from_rpc_error(error)
        except asyncio.CancelledError:
            return None

    def _take(self, event: pb.Event) -> None:
        kind = event.WhichOneof("kind")
        if not event.turn_id and event.error.reason == SHUTTING_DOWN:
            # The server's in-band notice that it is ending the stream.
            self._goaway = ChatError.from_event(event.error)
            return
        if event.turn_id and event.seq <= self.last_seq:
            return  # already received before the stream was reopened
        if not event.turn_id and (kind in _SESSION_KINDS or kind == "message_relayed"):
            if event.seq <= self.last_seq:
                return  # already received before the stream was reopened
            self.last_seq = event.seq
            if kind == "message_relayed":
                if (
                    self._pending is not None
                    and event.message_relayed.client_message_id == self._pending[0]
                ):
                    self._started_seen = True  # it reached the agent: never send it again
                self._queue.put_nowait(event)
            else:
                self.notifications.put_nowait(event)
            return
        self.last_seq = max(self.last_seq, event.seq)
        if (
            kind == "turn_started"
            and self._pending is not None
            and event.turn_started.client_message_id == self._pending[0]
        ):
            self._started_seen = True
        if kind != "heartbeat":
            self._queue.put_nowait(event)
        if self._replay_through is not None and self.last_seq >= self._replay_through:
            self._replay_through = None
            self._resend_if_lost()

    def _resend_if_lost(self) -> None:
        """After a replay: a message whose turn never started here is sent again."""
        if self._pending is not None and not self._started_seen:
            cmid, text = self._pending
            request = pb.ChatRequest(message=pb.UserMessage(client_message_id=cmid, text=text))
            asyncio.get_running_loop().create_task(self._try_write(request))

    async def _reopen(self, error: ChatError) -> None:
        assert self._reconnect is not None
        last = error
        for attempt in range(self._reconnect.attempts):
            await asyncio.sleep(self._reconnect.delay(attempt, last, self._rng))
            try:
                call, first = await self._client.open_call(
                    self.session_id, None, self._timeout, after_seq=self.last_seq
                )
            except ChatError as failed:
                if not self._reconnect.worth_retrying(failed):
                    raise
                last = failed
                continue
            self._call = call
            self.reconnects += 1
            replay = first.session_started.replay
            self._replay_through = replay.through_seq
            if replay.truncated:
                self._queue.put_nowait(first)  # the caller sees that events were lost
            if replay.through_seq <= self.last_seq:
                self._replay_through = None
                self._resend_if_lost()
            return
        raise last

    async def send(
        self, text: str, client_message_id: str | None = None
    ) -> AsyncIterator[pb.Event]:
        """Send a user message and yield its turn's events, ending with the terminal one.

        Heartbeats are skipped. Raises `ChatError` if the stream ends first (after
        the reconnect attempts, when reconnecting).
        """
        cmid = client_message_id or uuid.uuid4().hex
        self._pending, self._started_seen = (cmid, text), False
        try:
            await self._write(
                pb.ChatRequest(message=pb.UserMessage(client_message_id=cmid, text=text))
            )
            while True:
                item = await self._queue.get()
                if item is _CLOSED:
                    self._queue.put_nowait(_CLOSED)
                    raise self._error or ChatError(
                        grpc.StatusCode.UNAVAILABLE, "the stream ended before the turn did"
                    )
                event: pb.Event = item
                kind = event.WhichOneof("kind")
                yield event
                if kind in _TERMINAL and (
                    event.turn_id or event.error.client_message_id in ("", cmid)
                ):
                    return
                if kind == "message_relayed" and event.message_relayed.client_message_id == cmid:
                    return  # a person owns the conversation: the message went to them
        finally:
            self._pending = None

    async def request_handoff(self, reason: str = "") -> None:
        """Ask for a human agent; what follows arrives in `notifications`."""
        await self._write(pb.ChatRequest(handoff=pb.RequestHandoff(reason=reason)))

    async def withdraw_handoff(self) -> None:
        """Leave the queue for a person (before an agent joins): `handoff_ended` with
        outcome ABANDONED follows in `notifications`, and the bot answers again."""
        await self._write(pb.ChatRequest(handoff=pb.RequestHandoff(withdraw=True)))

    async def next_notification(self, within: float | None = None) -> pb.Event:
        """The next handoff event or agent message (TimeoutError after `within` seconds)."""
        return await asyncio.wait_for(self.notifications.get(), within)

    async def cancel(self, turn_id: str = "") -> None:
        """Cancel the turn in flight (or the named one)."""
        await self._write(pb.ChatRequest(cancel=pb.CancelTurn(turn_id=turn_id)))

    async def _try_write(self, request: pb.ChatRequest) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call.write(request)

    async def _write(self, request: pb.ChatRequest) -> None:
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            if self._reconnect is not None and not self._reader.done():
                return  # the reader reopens the stream and sends the message again
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
        self._closing = True
        try:
            await self._call.done_writing()
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=5.0)
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
        reconnect: Reconnect | None = DEFAULT_RECONNECT,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self._metadata = tuple(metadata)
        self._reconnect = reconnect
        if channel is None:
            # Reconnect fast after a dropped connection (grpcio's default first wait is 1 s).
            settings = [*_CHANNEL_OPTIONS, *options]
            channel = (
                grpc.aio.secure_channel(target, credentials, options=settings)
                if credentials is not None
                else grpc.aio.insecure_channel(target, options=settings)
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
        *,
        after_seq: int | None = None,
    ) -> Conversation:
        """Open a Chat stream, starting a new session or resuming `session_id`.

        `after_seq` resumes from a cursor (the server replays what came after
        it); `stream_timeout` becomes the gRPC deadline of each stream.
        """
        call, first = await self.open_call(session_id, metadata, stream_timeout, after_seq)
        conversation = Conversation(
            self, call, first, reconnect=self._reconnect, stream_timeout=stream_timeout
        )
        if after_seq is not None:  # the replayed events come first, as they arrive
            conversation.last_seq = after_seq
        return conversation

    async def open_call(
        self,
        session_id: str,
        metadata: pb.SessionMetadata | None,
        stream_timeout: float | None,
        after_seq: int | None = None,
    ) -> tuple[Any, pb.Event]:
        """A new Chat call that has sent `start` and read `session_started`."""
        call = self._stub.Chat(metadata=self._metadata, timeout=stream_timeout)
        start = pb.StartSession(session_id=session_id, metadata=metadata)
        if after_seq is not None:
            start.after_seq = after_seq
        try:
            await call.write(pb.ChatRequest(start=start))
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            raise ChatError.from_rpc_error(error) from None
        if first is grpc.aio.EOF:
            raise ChatError(grpc.StatusCode.UNAVAILABLE, "the server closed the stream")
        return call, first.event

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

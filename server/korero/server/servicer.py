"""The gRPC transport: `korero.chat.v1.ChatService` over the conversation engine.

Thin on purpose: frames in become engine calls, engine events out become
frames. Errors inside a turn travel as `error` events; errors that end a
call become gRPC statuses with `google.rpc.ErrorInfo` (and `RetryInfo` when
a wait is known) in `grpc-status-details-bin`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.chat.v1 import chat_pb2_grpc
from korero.server.auth import current_identity
from korero.server.engine import ConversationEngine, Turn, error_event_body
from korero.server.errors import (
    InvalidArgumentError,
    KoreroError,
    ShuttingDownError,
)
from korero.server.settings import Settings
from korero.server.status import abort_with_error
from korero.server.telemetry import Metrics

__all__ = ["ChatServicer", "Lifecycle"]

log = logging.getLogger(__name__)

_TERMINAL = frozenset({"done", "error"})


class _Signal:
    """Out-of-band items on a stream's outbound queue."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_DRAIN = _Signal("drain")
_HEARTBEAT = _Signal("heartbeat")
_END = _Signal("end")


class Lifecycle:
    """Serving or draining; tells open streams when the server starts to drain."""

    def __init__(self) -> None:
        self.draining = False
        self._streams: set[asyncio.Queue[Any]] = set()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def check_open(self) -> None:
        if self.draining:
            raise ShuttingDownError()

    def register(self, queue: asyncio.Queue[Any]) -> None:
        self._streams.add(queue)

    def unregister(self, queue: asyncio.Queue[Any]) -> None:
        self._streams.discard(queue)

    def begin_drain(self) -> None:
        self.draining = True
        for queue in self._streams:
            queue.put_nowait(_DRAIN)


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The client's deadline on the engine clock, a little early.

    Ending the turn slightly before the call's own deadline leaves time to
    deliver the terminal event instead of the bare DEADLINE_EXCEEDED status.
    """
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + max(0.0, remaining - min(0.1, remaining * 0.1))


@dataclass
class _Stream:
    """State of one Chat stream."""

    tenant: str
    session_id: str
    out: asyncio.Queue[pb.Event | _Signal] = field(default_factory=asyncio.Queue)
    turn: Turn | None = None
    last_seq: int = 0
    draining: bool = False
    active: bool = True  # something was sent since the last heartbeat check

    def sink(self, event: pb.Event) -> None:
        self.out.put_nowait(event)

    def rejection(self, error: KoreroError, client_message_id: str = "") -> pb.Event:
        """An error outside any turn: not part of the resumable log, so it repeats the seq."""
        return pb.Event(
            session_id=self.session_id,
            seq=self.last_seq,
            error=error_event_body(error, client_message_id),
        )

    def reject(self, error: KoreroError, client_message_id: str = "") -> None:
        self.out.put_nowait(self.rejection(error, client_message_id))

    @property
    def turn_in_flight(self) -> bool:
        return self.turn is not None and not self.turn.done


class _Heartbeat:
    """Queues a heartbeat on a stream that sent nothing for a whole interval."""

    def __init__(self, stream: _Stream, interval: float) -> None:
        self._stream = stream
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        if not self._stream.active:
            self._stream.out.put_nowait(_HEARTBEAT)
        self._stream.active = False
        self._handle = self._loop.call_later(self._interval, self._tick)

    def cancel(self) -> None:
        self._handle.cancel()


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """ChatService on the conversation engine."""

    def __init__(
        self,
        engine: ConversationEngine,
        settings: Settings,
        lifecycle: Lifecycle,
        metrics: Metrics,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._lifecycle = lifecycle
        self._metrics = metrics

    def _tenant(self) -> str:
        # Set by AuthInterceptor; without authentication every caller is the default tenant.
        identity = current_identity()
        return identity.tenant if identity is not None else self._settings.engine.tenant

    # Chat: one bidirectional stream per session -----------------------------------

    async def Chat(  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ChatRequest],
        context: grpc.aio.ServicerContext[pb.ChatRequest, pb.ChatResponse],
    ) -> AsyncIterator[pb.ChatResponse]:
        try:
            # The first frame is read before refusing a draining server's stream:
            # a client still writing it when the status lands would see INTERNAL.
            first = await self._first_frame(request_iterator)
            self._lifecycle.check_open()
            tenant = self._tenant()
            started = await self._engine.open_session(
                tenant, first.start.session_id, first.start.metadata
            )
        except KoreroError as error:
            await abort_with_error(context, error)
        stream = _Stream(tenant, started.session_id, last_seq=started.seq)
        yield pb.ChatResponse(event=started)
        self._lifecycle.register(stream.out)
        self._metrics.active_streams.inc()
        reader = asyncio.create_task(self._read(request_iterator, context, stream))
        heartbeat = _Heartbeat(stream, self._settings.server.heartbeat_interval)
        try:
            async for response in self._pump(stream):
                yield response
            if stream.draining:
                # Say it in-band first: a client writing while the status
                # arrives may see its call fail with INTERNAL instead.
                goaway = ShuttingDownError()
                yield pb.ChatResponse(event=stream.rejection(goaway))
                await abort_with_error(context, goaway)
        finally:
            heartbeat.cancel()
            reader.cancel()
            self._lifecycle.unregister(stream.out)
            self._metrics.active_streams.dec()
            if stream.turn_in_flight:
                assert stream.turn is not None
                stream.turn.unsubscribe(stream.sink)
                stream.turn.cancel()  # the client went away: stop the upstream call

    async def _first_frame(self, requests: AsyncIterator[pb.ChatRequest]) -> pb.ChatRequest:
        timeout = self._settings.server.first_frame_timeout
        try:
            async with asyncio.timeout(timeout):
                first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgumentError(
                "FIRST_FRAME_MISSING", "the stream closed before its first frame (start)"
            ) from None
        except TimeoutError:
            raise KoreroError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "FIRST_FRAME_TIMEOUT",
                f"no start frame within {timeout:g}s",
            ) from None
        if first.WhichOneof("kind") != "start":
            raise InvalidArgumentError(
                "FIRST_FRAME_NOT_START", "the first frame of a Chat stream must be `start`"
            )
        return first

    async def _pump(self, stream: _Stream) -> AsyncIterator[pb.ChatResponse]:
        """Outbound frames until the client half-closes or the server drains."""
        while True:
            item = await stream.out.get()
            if isinstance(item, _Signal):
                if item is _END:
                    return
                if item is _HEARTBEAT:
                    yield pb.ChatResponse(
                        event=pb.Event(
                            session_id=stream.session_id,
                            seq=stream.last_seq,
                            heartbeat=pb.Heartbeat(),
                        )
                    )
                    continue
                stream.draining = True  # _DRAIN
                if not stream.turn_in_flight:
                    return
                continue
            stream.active = True
            stream.last_seq = max(stream.last_seq, item.seq)
            yield pb.ChatResponse(event=item)
            if stream.draining and item.WhichOneof("kind") in _TERMINAL:
                return

    async def _read(
        self,
        requests: AsyncIterator[pb.ChatRequest],
        context: grpc.aio.ServicerContext[Any, Any],
        stream: _Stream,
    ) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "message":
                    await self._on_message(request.message, context, stream)
                elif kind == "cancel":
                    turn = stream.turn
                    wanted = request.cancel.turn_id
                    if turn is not None and (not wanted or wanted == turn.turn_id):
                        turn.cancel()
                elif kind == "start":
                    stream.reject(
                        InvalidArgumentError(
                            "SESSION_ALREADY_STARTED", "`start` is only valid as the first frame"
                        )
                    )
                else:
                    stream.reject(InvalidArgumentError("REQUEST_EMPTY", "the request sets no kind"))
        except (grpc.aio.AioRpcError, grpc.aio.AbortError, grpc.aio.UsageError):
            return  # the call ended under us; the handler's cleanup runs
        # Half-close: finish the turn in flight, then end the stream cleanly.
        if stream.turn is not None:
            await stream.turn.wait()
        stream.out.put_nowait(_END)

    async def _on_message(
        self,
        message: pb.UserMessage,
        context: grpc.aio.ServicerContext[Any, Any],
        stream: _Stream,
    ) -> None:
        current = stream.turn
        if current is not None and not current.done:
            if current.client_message_id == message.client_message_id:
                return  # a resend of the message being answered on this very stream
            stream.reject(
                InvalidArgumentError(
                    "TURN_IN_FLIGHT",
                    f"turn {current.turn_id} is still in flight; wait for it to end or cancel it",
                ),
                message.client_message_id,
            )
            return
        if stream.draining:
            return
        try:
            stream.turn = await self._engine.start_turn(
                stream.tenant, stream.session_id, message, stream.sink, _deadline(context)
            )
        except KoreroError as error:
            stream.reject(error, message.client_message_id)

    # SendMessage: one turn, server streaming ---------------------------------------

    async def SendMessage(  # noqa: N802 - the gRPC method name
        self,
        request: pb.SendMessageRequest,
        context: grpc.aio.ServicerContext[pb.SendMessageRequest, pb.SendMessageResponse],
    ) -> AsyncIterator[pb.SendMessageResponse]:
        out: asyncio.Queue[pb.Event] = asyncio.Queue()
        turn: Turn | None = None
        self._metrics.active_streams.inc()
        try:
            try:
                self._lifecycle.check_open()
                tenant = self._tenant()
                session_id = request.session_id
                if not session_id:
                    started = await self._engine.open_session(tenant, "", request.metadata)
                    session_id = started.session_id
                    out.put_nowait(started)
                turn = await self._engine.start_turn(
                    tenant, session_id, request.message, out.put_nowait, _deadline(context)
                )
            except KoreroError as error:
                await abort_with_error(context, error)
            while True:
                event = await out.get()
                yield pb.SendMessageResponse(event=event)
                if event.WhichOneof("kind") in _TERMINAL:
                    return
        finally:
            self._metrics.active_streams.dec()
            if turn is not None and not turn.done:
                turn.unsubscribe(out.put_nowait)
                turn.cancel()

    # Unary reads -----------------------------------------------------------------------

    async def GetSession(  # noqa: N802 - the gRPC method name
        self,
        request: pb.GetSessionRequest,
        context: grpc.aio.ServicerContext[pb.GetSessionRequest, pb.GetSessionResponse],
    ) -> pb.GetSessionResponse:
        try:
            session = await self._engine.get_session(self._tenant(), request.session_id)
        except KoreroError as error:
            await abort_with_error(context, error)
        return pb.GetSessionResponse(session=session)

    async def ListMessages(  # noqa: N802 - the gRPC method name
        self,
        request: pb.ListMessagesRequest,
        context: grpc.aio.ServicerContext[pb.ListMessagesRequest, pb.ListMessagesResponse],
    ) -> pb.ListMessagesResponse:
        try:
            return await self._engine.list_messages(
                self._tenant(),
                request.session_id,
                request.page_size,
                request.page_token,
            )
        except KoreroError as error:
            await abort_with_error(context, error)

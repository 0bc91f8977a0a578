"""The gRPC transport: `korero.chat.v1.ChatService` over the conversation engine.

Thin on purpose: frames in become engine calls, engine events out become
frames. Errors inside a turn travel as `error` events; errors that end a
call become gRPC statuses with `google.rpc.ErrorInfo` (and `RetryInfo` when
a wait is known) in `grpc-status-details-bin`.

Every method is registered with a streaming request (`add_to_server`), the
unary ones included — the wire format is the same. grpcio aio never answers a
unary call whose body ends before one whole message (empty or truncated),
and reports an undecodable one as UNKNOWN naming a Python class; reading the
request ourselves answers both with INVALID_ARGUMENT (`REQUEST_MISSING`,
`REQUEST_UNDECODABLE`) at once. A Chat stream's reader turns any failure into
an in-band `error` event and a status that ends the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from korero.chat.v1 import chat_pb2 as pb
from korero.server.conversation.engine import ConversationEngine, Turn
from korero.server.errors import (
    InvalidArgumentError,
    KoreroError,
    ShuttingDownError,
)
from korero.server.telemetry import Metrics
from korero.server.transport.chat_session import (
    ChatSession,
    StreamRules,
    cursor_of,
    read_first_frame,
)
from korero.server.transport.interceptors import current_identity
from korero.server.transport.lifecycle import Lifecycle
from korero.server.transport.outbound import OutboundQueue, StreamWriter, queue_full
from korero.server.transport.status import abort_with_error

__all__ = ["ChatServicer"]

log = logging.getLogger(__name__)

_TERMINAL = frozenset({"done", "error"})


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The client's deadline on the engine clock, early enough for the terminal event."""
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + remaining - deadline_margin(remaining)


_DELIVERY = 0.4  # seconds: persisting the outcome (at least 0.15 s) and sending the event
_MARGIN_SHARE = 0.3  # at most this share of a short deadline


def deadline_margin(remaining: float) -> float:
    """How long before the client's deadline a turn must end to be heard.

    `grpc-timeout` travels rounded *up* (to 10 ms between 1 and 10 s, 100 ms
    up to 100 s, 1 s up to 1000 s, then coarser), so this side may see the
    deadline up to that much later than the client; the terminal event then
    still needs to be persisted and delivered. A 0.1 s margin lost about half
    the turns with deadlines of 10 s or more to a bare DEADLINE_EXCEEDED.
    """
    rounding = 0.001
    while rounding * 1000 <= remaining and rounding < 100:
        rounding *= 10
    return min(rounding + _DELIVERY, remaining * _MARGIN_SHARE)


SERVICE = pb.DESCRIPTOR.services_by_name["ChatService"].full_name

_M = TypeVar("_M", bound=Message)


def request_decoder(message_type: type[_M]) -> Callable[[bytes], _M]:
    """A request deserializer whose failure is INVALID_ARGUMENT, not a Python class name."""
    name = message_type.DESCRIPTOR.full_name

    def decode(raw: bytes) -> _M:
        try:
            return message_type.FromString(raw)
        except DecodeError:
            raise InvalidArgumentError(
                "REQUEST_UNDECODABLE", f"the request is not a valid {name}"
            ) from None

    return decode


class ChatServicer:
    """ChatService on the conversation engine."""

    def __init__(
        self,
        *,
        engine: ConversationEngine,
        lifecycle: Lifecycle,
        metrics: Metrics,
        rules: StreamRules,
        default_tenant: str,
    ) -> None:
        self._engine = engine
        self._rules = rules
        self._default_tenant = default_tenant
        self._lifecycle = lifecycle
        self._metrics = metrics

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register every method, each with a streaming request (see the module docstring)."""

        def handler(method: Any, kind: Any, request: type[Message], response: Any) -> Any:
            return kind(
                method,
                request_deserializer=request_decoder(request),
                response_serializer=response.SerializeToString,
            )

        handlers = {
            "Chat": handler(
                self.Chat, grpc.stream_stream_rpc_method_handler, pb.ChatRequest, pb.ChatResponse
            ),
            "SendMessage": handler(
                self.SendMessage,
                grpc.stream_stream_rpc_method_handler,
                pb.SendMessageRequest,
                pb.SendMessageResponse,
            ),
            "GetSession": handler(
                self.GetSession,
                grpc.stream_unary_rpc_method_handler,
                pb.GetSessionRequest,
                pb.GetSessionResponse,
            ),
            "ListMessages": handler(
                self.ListMessages,
                grpc.stream_unary_rpc_method_handler,
                pb.ListMessagesRequest,
                pb.ListMessagesResponse,
            ),
            "DeleteSession": handler(
                self.DeleteSession,
                grpc.stream_unary_rpc_method_handler,
                pb.DeleteSessionRequest,
                pb.DeleteSessionResponse,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)

    async def _request(self, requests: AsyncIterator[_M]) -> _M:
        """The one request message of a unary-request method."""
        try:
            async with asyncio.timeout(self._rules.first_frame_timeout):
                request = await anext(aiter(requests), None)
        except TimeoutError:
            raise KoreroError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "REQUEST_TIMEOUT",
                f"no request message within {self._rules.first_frame_timeout:g}s",
            ) from None
        if request is None:
            raise InvalidArgumentError(
                "REQUEST_MISSING", "the call ended before a whole request message"
            )
        return request

    def _tenant(self) -> str:
        # Set by the gate; without authentication every caller is the default tenant.
        identity = current_identity()
        return identity.tenant if identity is not None else self._default_tenant

    # Chat: one bidirectional stream per session -----------------------------------

    async def Chat(  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ChatRequest],
        context: grpc.aio.ServicerContext[pb.ChatRequest, pb.ChatResponse],
    ) -> AsyncIterator[pb.ChatResponse]:
        # Responses go out through `context.write` (a write blocked by a client that
        # stopped reading can then be interrupted); this stays an async generator
        # that yields nothing, the shape streaming interceptors expect.
        try:
            # The first frame is read before refusing a draining server's stream:
            # a client still writing it when the status lands would see INTERNAL.
            first = await read_first_frame(
                lambda: anext(request_iterator, None),
                self._rules.first_frame_timeout,
                "Chat stream",
            )
            self._lifecycle.check_open()
            tenant = self._tenant()
            opened = await self._engine.open_session(
                tenant, first.start.session_id, first.start.metadata, cursor_of(first.start)
            )
        except KoreroError as error:
            await abort_with_error(context, error)
        session = ChatSession(self._engine, tenant, opened, self._rules, lambda: _deadline(context))
        writer = StreamWriter(context.write)
        session.on_overflow = writer.interrupt
        await writer.write(pb.ChatResponse(event=opened.started))
        del first, opened  # not held (protobuf arenas, replayed events) for the stream's life
        self._lifecycle.register(session)
        self._metrics.active_streams.inc()
        reader = asyncio.create_task(self._read(request_iterator, session))
        try:
            async for event in session.outbound():
                if not await writer.write(pb.ChatResponse(event=event)):
                    break
            ending = session.failure or (ShuttingDownError() if session.draining else None)
            if ending is not None:
                # Say it in-band first (unless the client is not reading): a client
                # writing while the status arrives may see INTERNAL instead.
                if not session.overflowed:
                    await writer.write(pb.ChatResponse(event=session.rejection(ending)))
                await abort_with_error(context, ending)
        finally:
            reader.cancel()
            self._lifecycle.unregister(session)
            self._metrics.active_streams.dec()
            session.close()  # a turn still in flight: cancelled unless resumed within the grace
        return
        yield  # pragma: no cover - an async generator, see above

    @staticmethod
    async def _read(requests: AsyncIterator[pb.ChatRequest], session: ChatSession) -> None:
        """Hand each frame to the session; any failure ends the stream with a status."""
        try:
            async for request in requests:
                await session.handle(request)
        except (grpc.aio.AioRpcError, grpc.aio.AbortError, grpc.aio.UsageError):
            return  # the call ended under us; the handler's cleanup runs
        except KoreroError as error:  # an undecodable frame
            session.fail(error)
            return
        except Exception:
            log.exception("event=chat_reader_failed session_id=%s", session.session_id)
            session.fail(KoreroError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error"))
            return
        await session.finish()  # half-close: the turn in flight ends, then the stream

    # SendMessage: one turn, server streaming ---------------------------------------

    async def SendMessage(  # noqa: N802 - the gRPC method name
        self,
        requests: AsyncIterator[pb.SendMessageRequest],
        context: grpc.aio.ServicerContext[pb.SendMessageRequest, pb.SendMessageResponse],
    ) -> AsyncIterator[pb.SendMessageResponse]:
        # Written like Chat: `context.write`, interruptible, no yields.
        writer = StreamWriter(context.write)
        out: OutboundQueue[None] = self._rules.outbound_queue()
        turn: Turn | None = None

        def overflowed() -> None:  # the client stopped reading: stop the turn, end the call
            if turn is not None:
                turn.unsubscribe(out.put)
                turn.cancel(error=queue_full())
            writer.interrupt()

        out.on_overflow = overflowed
        self._metrics.active_streams.inc()
        try:
            try:
                request = await self._request(requests)
                self._lifecycle.check_open()
                tenant = self._tenant()
                self._engine.check_message(request.message)  # before a session is created
                session_id = request.session_id
                if not session_id:
                    opened = await self._engine.open_session(tenant, "", request.metadata)
                    session_id = opened.session_id
                    out.put(opened.started)
                replay, turn = await self._send_turn(tenant, session_id, request, out, context)
            except KoreroError as error:
                await abort_with_error(context, error)
            for logged in replay:  # a retried call's logged events, outside the bounded queue
                if not await writer.write(pb.SendMessageResponse(event=logged)):
                    return
                if logged.WhichOneof("kind") in _TERMINAL:
                    return
            while (event := await out.get()) is not None:
                if not await writer.write(pb.SendMessageResponse(event=event)):
                    break
                if event.WhichOneof("kind") in _TERMINAL:
                    return
            await abort_with_error(context, queue_full())
        finally:
            self._metrics.active_streams.dec()
            if turn is not None and not turn.done:
                # The client went away: cancelled unless it comes back within the grace.
                self._engine.detach(turn, out.put)
        yield  # pragma: no cover - an async generator, see Chat

    async def _send_turn(
        self,
        tenant: str,
        session_id: str,
        request: pb.SendMessageRequest,
        out: OutboundQueue[None],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tuple[list[pb.Event], Turn | None]:
        """The turn of a SendMessage call; with `after_seq`, a retry of a call that broke
        off gets the rest of that same turn (logged events first, then live), not a replay."""
        if request.HasField("after_seq") and request.session_id:
            resumed = await self._engine.resume_turn(
                tenant,
                session_id,
                request.message.client_message_id,
                request.after_seq,
                out.put,
                _deadline(context),
            )
            if resumed is not None:
                return resumed
        turn = await self._engine.start_turn(
            tenant, session_id, request.message, out.put, _deadline(context)
        )
        return [], turn

    # Unary reads -----------------------------------------------------------------------

    async def GetSession(  # noqa: N802 - the gRPC method name
        self,
        requests: AsyncIterator[pb.GetSessionRequest],
        context: grpc.aio.ServicerContext[pb.GetSessionRequest, pb.GetSessionResponse],
    ) -> pb.GetSessionResponse:
        try:
            request = await self._request(requests)
            session = await self._engine.get_session(self._tenant(), request.session_id)
        except KoreroError as error:
            await abort_with_error(context, error)
        return pb.GetSessionResponse(session=session)

    async def ListMessages(  # noqa: N802 - the gRPC method name
        self,
        requests: AsyncIterator[pb.ListMessagesRequest],
        context: grpc.aio.ServicerContext[pb.ListMessagesRequest, pb.ListMessagesResponse],
    ) -> pb.ListMessagesResponse:
        try:
            request = await self._request(requests)
            return await self._engine.list_messages(
                self._tenant(),
                request.session_id,
                request.page_size,
                request.page_token,
            )
        except KoreroError as error:
            await abort_with_error(context, error)

    async def DeleteSession(  # noqa: N802 - the gRPC method name
        self,
        requests: AsyncIterator[pb.DeleteSessionRequest],
        context: grpc.aio.ServicerContext[pb.DeleteSessionRequest, pb.DeleteSessionResponse],
    ) -> pb.DeleteSessionResponse:
        try:
            request = await self._request(requests)
            await self._engine.delete_session(
                self._tenant(), request.session_id, request.allow_missing
            )
        except KoreroError as error:
            await abort_with_error(context, error)
        return pb.DeleteSessionResponse()

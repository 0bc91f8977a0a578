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
from typing import Any

import grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.chat.v1 import chat_pb2_grpc
from korero.server.conversation.engine import ConversationEngine, Turn
from korero.server.errors import (
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
from korero.server.transport.status import abort_with_error

__all__ = ["ChatServicer"]

log = logging.getLogger(__name__)

_TERMINAL = frozenset({"done", "error"})


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The client's deadline on the engine clock, a little early.

    Ending the turn slightly before the call's own deadline leaves time to
    deliver the terminal event instead of the bare DEADLINE_EXCEEDED status.
    """
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + max(0.0, remaining - min(0.1, remaining * 0.1))


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
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
        session = ChatSession(
            self._engine,
            tenant,
            opened,
            self._rules.heartbeat_interval,
            lambda: _deadline(context),
        )
        yield pb.ChatResponse(event=opened.started)
        self._lifecycle.register(session)
        self._metrics.active_streams.inc()
        reader = asyncio.create_task(self._read(request_iterator, session))
        try:
            async for event in session.outbound():
                yield pb.ChatResponse(event=event)
            if session.draining:
                # Say it in-band first: a client writing while the status
                # arrives may see its call fail with INTERNAL instead.
                goaway = ShuttingDownError()
                yield pb.ChatResponse(event=session.rejection(goaway))
                await abort_with_error(context, goaway)
        finally:
            reader.cancel()
            self._lifecycle.unregister(session)
            self._metrics.active_streams.dec()
            session.close()  # a turn still in flight: cancelled unless resumed within the grace

    @staticmethod
    async def _read(requests: AsyncIterator[pb.ChatRequest], session: ChatSession) -> None:
        try:
            async for request in requests:
                await session.handle(request)
        except (grpc.aio.AioRpcError, grpc.aio.AbortError, grpc.aio.UsageError):
            return  # the call ended under us; the handler's cleanup runs
        await session.finish()  # half-close: the turn in flight ends, then the stream

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
                    opened = await self._engine.open_session(tenant, "", request.metadata)
                    session_id = opened.session_id
                    out.put_nowait(opened.started)
                turn = await self._engine.start_turn_shielded(
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
                # The client went away: cancelled unless it comes back within the grace.
                self._engine.detach(turn, out.put_nowait)

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

    async def DeleteSession(  # noqa: N802 - the gRPC method name
        self,
        request: pb.DeleteSessionRequest,
        context: grpc.aio.ServicerContext[pb.DeleteSessionRequest, pb.DeleteSessionResponse],
    ) -> pb.DeleteSessionResponse:
        try:
            await self._engine.delete_session(
                self._tenant(), request.session_id, request.allow_missing
            )
        except KoreroError as error:
            await abort_with_error(context, error)
        return pb.DeleteSessionResponse()

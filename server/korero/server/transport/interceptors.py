"""The call gate as a gRPC interceptor: a check before the call, no wrapper after it.

`GateInterceptor` asks the `CallGate` inside `intercept_service` — which
grpc.aio awaits in the task that then runs the handler, so the caller's
identity, set here in a context variable, is visible to the servicer
(`current_identity`). It is the only interceptor that decides anything, so no
policy is handed from one interceptor to another. When the gate admits the
call, the method's own handler is returned untouched: nothing is added per
streamed message. When it refuses, a handler of the same kind is returned
that ends the call with that error's status and details.

One exception: credentials whose check the gate throttles by client address
(an API key not seen before, see policy/throttle.py) are checked inside the
handler, where `context.peer()` is known (`admitting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from korero.server.errors import KoreroError
from korero.server.policy.gate import CallGate
from korero.server.policy.identity import Identity
from korero.server.transport.status import abort_with_error

__all__ = ["GateInterceptor", "current_identity", "refusal"]

_DRAIN_FIRST_FRAME = 1.0  # seconds

_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "korero_identity", default=None
)


def current_identity() -> Identity | None:
    """The identity of the call being served (None: no gate, or an open method)."""
    return _identity.get()


class GateInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Applies the `CallGate` to every gRPC call."""

    def __init__(self, gate: CallGate) -> None:
        self._gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if self._gate.is_open(method):
            return await continuation(handler_call_details)
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode()
        if self._gate.needs_peer(method, authorization):
            # The client's address is only known to the handler's context.
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            return admitting(handler, self._gate, method, authorization)
        refused: KoreroError | None = None
        try:
            _identity.set(await self._gate.admit(method, authorization))
        except KoreroError as error:
            refused = error
        handler = await continuation(handler_call_details)
        if refused is None or handler is None:
            return handler
        return refusal(handler, refused)


async def _refuse(
    context: grpc.aio.ServicerContext[Any, Any], error: KoreroError, requests: Any = None
) -> None:
    if requests is not None:
        # Take the client's first frame before refusing: a client still writing
        # it when the status lands sees its call fail with INTERNAL ("Internal
        # error from Core") instead of our status.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(anext(aiter(requests)), _DRAIN_FIRST_FRAME)
    await abort_with_error(context, error)


def admitting(
    handler: grpc.RpcMethodHandler, gate: CallGate, method: str, authorization: str | None
) -> grpc.RpcMethodHandler:
    """`handler`, asking the gate first with the client's address (`context.peer()`).

    Only for calls whose credentials cost a lookup the gate throttles by
    address; the wrapper is one call deep (streaming responses here are
    written through the context, so nothing is added per message).
    """

    async def admit(context: Any, requests: Any = None) -> None:
        try:
            _identity.set(await gate.admit(method, authorization, peer=context.peer()))
        except KoreroError as error:
            await _refuse(context, error, requests)  # ends the call

    common = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await admit(context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **common)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            await admit(context)
            async for response in inner_us(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **common)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            await admit(context, requests)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **common)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        await admit(context, requests)
        async for response in inner_ss(requests, context):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, **common)


def refusal(handler: grpc.RpcMethodHandler, error: KoreroError) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that ends every call with `error`."""
    common = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:

        async def unary_unary(request: Any, context: Any) -> Any:
            await _refuse(context, error)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **common)
    if handler.unary_stream:

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            await _refuse(context, error)
            yield  # pragma: no cover - makes this an async generator

        return grpc.unary_stream_rpc_method_handler(unary_stream, **common)
    if handler.stream_unary:

        async def stream_unary(requests: Any, context: Any) -> Any:
            await _refuse(context, error, requests)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **common)

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        await _refuse(context, error, requests)
        yield  # pragma: no cover - makes this an async generator

    return grpc.stream_stream_rpc_method_handler(stream_stream, **common)

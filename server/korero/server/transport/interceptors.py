"""One shape for every interceptor: a check before the call, no wrapper after it.

`checked` runs a check inside `intercept_service` — which grpc.aio awaits in
the task that then runs the handler, so context variables set by the check
(the caller's identity) are visible to the handler. When the check passes,
the method's own handler is returned untouched: nothing is added per
streamed message. When it raises `KoreroError`, a handler of the same kind
is returned that ends the call with that error's status and details.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from korero.server.errors import KoreroError
from korero.server.transport.status import abort_with_error

__all__ = ["checked", "refusal"]

_DRAIN_FIRST_FRAME = 1.0  # seconds


async def checked(
    handler: grpc.RpcMethodHandler, check: Callable[[], Awaitable[object]]
) -> grpc.RpcMethodHandler:
    """`handler` if `check` passes, else a handler refusing the call."""
    try:
        await check()
    except KoreroError as error:
        return refusal(handler, error)
    return handler


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

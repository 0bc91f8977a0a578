"""One shape for every interceptor: run a check before any kind of handler.

`wrap_handler` returns a copy of a method handler whose behaviour first awaits
`before(context)`. A `KoreroError` from `before` ends the call with that
error's status (and details); anything set in context variables by `before`
is visible to the handler, which runs in the same task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from korero.server.errors import KoreroError
from korero.server.status import abort_with_error

__all__ = ["Before", "wrap_handler"]

_DRAIN_FIRST_FRAME = 1.0  # seconds

Before = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


async def _check(
    before: Before, context: grpc.aio.ServicerContext[Any, Any], requests: Any = None
) -> None:
    try:
        await before(context)
    except KoreroError as error:
        if requests is not None:
            # Take the client's first frame before refusing: a client still
            # writing it when the status lands sees its call fail with
            # INTERNAL ("Internal error from Core") instead of our status.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(anext(aiter(requests)), _DRAIN_FIRST_FRAME)
        await abort_with_error(context, error)


def wrap_handler(handler: grpc.RpcMethodHandler, before: Before) -> grpc.RpcMethodHandler:
    """`handler`, with `before` awaited at the start of every call."""
    common = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await _check(before, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **common)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            await _check(before, context)
            async for response in inner_us(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **common)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            await _check(before, context, requests)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **common)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        await _check(before, context, requests)
        async for response in inner_ss(requests, context):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, **common)

"""`KoreroError` → gRPC status with `google.rpc` details, in one place."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from korero.server.errors import ERROR_DOMAIN, KoreroError

__all__ = ["abort_with_error", "error_status"]


def error_status(error: KoreroError) -> grpc.Status:
    """A `KoreroError` as a gRPC status with ErrorInfo (and RetryInfo) details."""
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=error.reason,
            domain=ERROR_DOMAIN,
            metadata={"retryable": str(error.retryable).lower(), **error.metadata},
        )
    )
    details = [info]
    if error.retry_after is not None:
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


async def abort_with_error(
    context: grpc.aio.ServicerContext[Any, Any], error: KoreroError
) -> NoReturn:
    """End the call with `error` as its status."""
    await context.abort_with_status(error_status(error))
    raise AssertionError("abort_with_status returned")  # pragma: no cover

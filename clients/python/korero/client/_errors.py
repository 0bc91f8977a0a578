"""The client's one exception type."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from korero.chat.v1 import chat_pb2 as pb

__all__ = ["ChatError"]

_DETAILS_KEY = "grpc-status-details-bin"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ChatError(Exception):
    """A call or stream ended with a non-OK status.

    `reason` and `retry_after` come from the `google.rpc.ErrorInfo` and
    `google.rpc.RetryInfo` details the server attaches.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    @classmethod
    def from_event(cls, error: pb.TurnError) -> ChatError:
        """An `error` event as an exception (for callers that prefer raising)."""
        retry_after = None
        if error.HasField("retry_after"):
            retry_after = error.retry_after.ToNanoseconds() / 1e9
        return cls(
            _CODES.get(error.code, grpc.StatusCode.UNKNOWN),
            error.message,
            error.reason,
            error.retryable,
            retry_after,
        )

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> ChatError:
        """Translate grpcio's error, reading rich status details when present."""
        reason, retryable, retry_after = "", False, None
        for key, value in error.trailing_metadata() or ():
            if key != _DETAILS_KEY or not isinstance(value, bytes):
                continue
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                    retryable = info.metadata.get("retryable") == "true"
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        code = error.code()
        if code in (grpc.StatusCode.UNAVAILABLE,) and not reason:
            retryable = True
        return cls(code, error.details() or code.name, reason, retryable, retry_after)

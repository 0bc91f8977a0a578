"""The one table from `openai` (and HTTP transport) exceptions to `UpstreamError`.

Every exception class the `openai` package exports has a row (a test
enumerates them); the most specific class of an exception wins.
"""

from __future__ import annotations

import grpc
import httpx2 as httpx  # the HTTP library of openai>=3; its errors can escape a stream
import openai

from korero.server.errors import UpstreamError

__all__ = ["OPENAI_ERROR_TABLE", "translate_openai_error"]


# (code, reason, retryable) by exception class; the most specific class wins.
OPENAI_ERROR_TABLE: dict[type[BaseException], tuple[grpc.StatusCode, str, bool]] = {
    openai.OpenAIError: (grpc.StatusCode.INTERNAL, "UPSTREAM_ERROR", False),
    openai.APIError: (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR", True),
    openai.APIConnectionError: (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNREACHABLE", True),
    openai.APITimeoutError: (grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT", True),
    openai.APIResponseValidationError: (
        grpc.StatusCode.INTERNAL,
        "UPSTREAM_BAD_RESPONSE",
        False,
    ),
    openai.APIStatusError: (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_STATUS_ERROR", True),
    openai.BadRequestError: (grpc.StatusCode.INTERNAL, "UPSTREAM_REJECTED_REQUEST", False),
    openai.AuthenticationError: (grpc.StatusCode.INTERNAL, "UPSTREAM_AUTH_FAILED", False),
    openai.OAuthError: (grpc.StatusCode.INTERNAL, "UPSTREAM_AUTH_FAILED", False),
    openai.PermissionDeniedError: (grpc.StatusCode.INTERNAL, "UPSTREAM_PERMISSION_DENIED", False),
    openai.NotFoundError: (grpc.StatusCode.INTERNAL, "UPSTREAM_MODEL_NOT_FOUND", False),
    openai.ConflictError: (grpc.StatusCode.ABORTED, "UPSTREAM_CONFLICT", True),
    openai.UnprocessableEntityError: (
        grpc.StatusCode.INTERNAL,
        "UPSTREAM_REJECTED_REQUEST",
        False,
    ),
    openai.RateLimitError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", True),
    openai.InternalServerError: (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_SERVER_ERROR", True),
    openai.LengthFinishReasonError: (grpc.StatusCode.INTERNAL, "UPSTREAM_LENGTH_LIMIT", False),
    openai.ContentFilterFinishReasonError: (
        grpc.StatusCode.INTERNAL,
        "UPSTREAM_CONTENT_FILTERED",
        False,
    ),
    openai.InvalidWebhookSignatureError: (grpc.StatusCode.INTERNAL, "UPSTREAM_ERROR", False),
    openai.WebSocketConnectionClosedError: (
        grpc.StatusCode.UNAVAILABLE,
        "UPSTREAM_UNREACHABLE",
        True,
    ),
    openai.WebSocketQueueFullError: (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_OVERLOADED", True),
}

_USER_MESSAGES = {
    "UPSTREAM_RATE_LIMITED": "the assistant is busy right now; please try again shortly",
    "UPSTREAM_TIMEOUT": "the assistant took too long to answer; please try again",
    "UPSTREAM_UNREACHABLE": "the assistant is unreachable right now; please try again",
}


def translate_openai_error(exc: BaseException, *, mid_stream: bool = False) -> UpstreamError:
    """The one mapping from an `openai` (or HTTP transport) exception to our error.

    `mid_stream`: the response had started, so a lost connection means the
    answer was cut (openai raises APIConnectionError for that).
    """
    lost = (openai.APIConnectionError, httpx.TransportError, httpx.StreamError)
    if isinstance(exc, httpx.TransportError | httpx.StreamError) or (
        mid_stream and isinstance(exc, lost)
    ):
        return UpstreamError(
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_STREAM_INTERRUPTED",
            "the assistant's answer was interrupted; please try again",
            retryable=True,
        )
    for cls in type(exc).__mro__:
        if cls in OPENAI_ERROR_TABLE:
            code, reason, retryable = OPENAI_ERROR_TABLE[cls]
            break
    else:
        code, reason, retryable = OPENAI_ERROR_TABLE[openai.OpenAIError]
    message = _USER_MESSAGES.get(reason, "the assistant could not answer; please try again later")
    retry_after = _retry_after(exc)
    status = getattr(exc, "status_code", None)
    detail = f" (upstream HTTP {status})" if status else ""
    return UpstreamError(
        code, reason, message + detail, retryable=retryable, retry_after=retry_after
    )


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return max(0.0, float(raw) * scale)
        except ValueError:
            continue
    return None

"""The exception tree of the server.

    KoreroError                 root: a gRPC status code, an UPPER_SNAKE reason,
     │                          a user-safe message, retryable, retry_after
     ├── InvalidArgumentError   bad input from the client (INVALID_ARGUMENT)
     ├── NotFoundError          a named resource does not exist (NOT_FOUND)
     ├── StoreUnavailableError  Redis down, slow or failing (UNAVAILABLE)
     ├── HistoryUnavailableError PostgreSQL down, slow or failing (UNAVAILABLE)
     ├── SessionLostError       the session vanished from Redis mid-turn (UNAVAILABLE)
     ├── UpstreamError          the LLM upstream failed (code depends on cause)
     ├── RateLimitedError       a limit is exhausted (RESOURCE_EXHAUSTED)
     ├── SessionOpensBusyError  too many sessions opening at once (RESOURCE_EXHAUSTED)
     └── ShuttingDownError      the server is draining (UNAVAILABLE)

Lower-layer exceptions (`redis`, `openai`) are translated into these exactly
once, at their boundary (`store.py`, `llm.py`). The transport turns a
`KoreroError` into a `TurnError` event inside a turn, or into a gRPC status
with `google.rpc.ErrorInfo` / `RetryInfo` details when it ends a call.
"""

from __future__ import annotations

import grpc

__all__ = [
    "ERROR_DOMAIN",
    "HistoryUnavailableError",
    "InvalidArgumentError",
    "KoreroError",
    "NotFoundError",
    "RateLimitedError",
    "SessionLostError",
    "SessionOpensBusyError",
    "ShuttingDownError",
    "StoreUnavailableError",
    "UpstreamError",
]

ERROR_DOMAIN = "korero.chat.v1"
"""`google.rpc.ErrorInfo.domain` of every error the server raises."""


class KoreroError(Exception):
    """Root of every error the server reports to clients."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.metadata = metadata or {}
        """Extra `google.rpc.ErrorInfo.metadata` (e.g. which limit)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason!r}, {self.message!r})"


class InvalidArgumentError(KoreroError):
    """The client sent something the server cannot accept."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, reason, message)


class NotFoundError(KoreroError):
    """A named resource does not exist (for this tenant)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, reason, message)


class StoreUnavailableError(KoreroError):
    """The session store could not be reached in time."""

    def __init__(
        self, message: str = "session store unavailable", *, maybe_applied: bool = True
    ) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            "STORE_UNAVAILABLE",
            message,
            retryable=True,
            retry_after=1.0,
        )
        self.maybe_applied = maybe_applied
        """False when Redis answered with an error (the command did not run); True when
        the reply never came (a timeout or a lost connection: it may have run)."""


class HistoryUnavailableError(KoreroError):
    """PostgreSQL (long-term history) could not be reached or failed."""

    def __init__(self, message: str = "history store unavailable") -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            "HISTORY_UNAVAILABLE",
            message,
            retryable=True,
            retry_after=1.0,
        )


class SessionLostError(KoreroError):
    """The session disappeared from Redis while a turn ran (Redis restarted empty)."""

    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            "SESSION_LOST",
            "the session was lost while this turn ran; resume the session and send it again",
            retryable=True,
        )


class UpstreamError(KoreroError):
    """The LLM upstream failed; `code` and `reason` say how."""


class RateLimitedError(KoreroError):
    """A rate limit is exhausted; `retry_after` says when to try again."""

    def __init__(self, limit: str, retry_after: float) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
            f"rate limit `{limit}` reached; retry in {retry_after:.1f}s",
            retryable=True,
            retry_after=retry_after,
            metadata={"limit": limit},
        )
        self.limit = limit


_OPENS_BUSY_WHY = {
    "queue_full": "its queue of opens is full",
    "waited_too_long": "this open waited too long for its turn",
}


class SessionOpensBusyError(KoreroError):
    """Too many session opens at once on this instance; `retry_after` says when to retry."""

    def __init__(self, retry_after: float, why: str) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "SESSION_OPENS_BUSY",
            f"this server is opening too many sessions at once ({_OPENS_BUSY_WHY.get(why, why)}); "
            f"retry in {retry_after:.2f}s",
            retryable=True,
            retry_after=retry_after,
            metadata={"why": why},
        )
        self.why = why
        """`queue_full` or `waited_too_long`."""


class ShuttingDownError(KoreroError):
    """The server is draining; the client should reconnect elsewhere."""

    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            "SERVER_SHUTTING_DOWN",
            "server is shutting down; reconnect and resume the session",
            retryable=True,
            retry_after=0.0,
        )

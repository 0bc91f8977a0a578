"""How a conversation reconnects after its stream breaks."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from korero.client._errors import ChatError

__all__ = ["DEFAULT_RECONNECT", "Reconnect"]


@dataclass(frozen=True)
class Reconnect:
    """Bounded retries with exponential backoff and full jitter.

    A broken stream (UNAVAILABLE, or any error the server marks retryable,
    e.g. `SERVER_SHUTTING_DOWN`) is reopened with the last seq received as the
    resume cursor; a `RetryInfo` delay from the server is honoured as a floor.
    """

    attempts: int = 6
    """Reopening attempts per break before the error is raised."""
    initial_backoff: float = 0.1
    """Seconds; the n-th attempt waits a random time up to initial × multiplier^n."""
    max_backoff: float = 3.0
    """Seconds; the most one wait can be (before RetryInfo)."""
    multiplier: float = 2.0

    def delay(self, attempt: int, error: ChatError | None, rng: random.Random) -> float:
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        wait = rng.uniform(0, ceiling)
        if error is not None and error.retry_after is not None:
            wait = max(wait, error.retry_after)
        return wait

    @staticmethod
    def worth_retrying(error: ChatError) -> bool:
        return error.retryable or (
            error.code
            in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.INTERNAL,  # grpcio's RST_STREAM of a connection cut mid-frame
            )
            and error.reason in ("", "SERVER_SHUTTING_DOWN", "STORE_UNAVAILABLE")
        )


DEFAULT_RECONNECT = Reconnect()

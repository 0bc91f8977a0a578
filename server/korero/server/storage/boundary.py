"""The one Redis error boundary.

Every component that talks to Redis (session store, response cache,
knowledge base, rate limiter, API keys) runs its calls inside
`redis_boundary()`, which turns any redis-py (or socket) exception into a
`KoreroError` by one table, `REDIS_ERROR_MAP`, read top to bottom (the first
matching class wins, so subclasses come before their bases):

    ConnectionError, TimeoutError, BusyLoading, ReadOnly,
    cluster down/moved/try-again, OOM, OSError   UNAVAILABLE  STORE_UNAVAILABLE  retryable
    NoScriptError (escaped the loader), other    INTERNAL     STORE_ERROR

A test enumerates redis-py's exception classes and checks each one maps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import redis.exceptions as rexc

from korero.server.errors import KoreroError, StoreUnavailableError

__all__ = ["REDIS_ERROR_MAP", "redis_boundary", "translate_redis_error"]

_UNAVAILABLE = "unavailable"
_INTERNAL = "internal"

REDIS_ERROR_MAP: tuple[tuple[type[BaseException], str], ...] = (
    # Redis could not be reached, answered too late, or cannot take writes now.
    (rexc.ConnectionError, _UNAVAILABLE),  # includes Authentication, MaxConnections
    (rexc.TimeoutError, _UNAVAILABLE),
    (rexc.BusyLoadingError, _UNAVAILABLE),
    (rexc.ReadOnlyError, _UNAVAILABLE),  # a replica after failover
    (rexc.OutOfMemoryError, _UNAVAILABLE),  # maxmemory with noeviction: writes refused
    (rexc.ClusterError, _UNAVAILABLE),  # ClusterDown, MasterDown
    (rexc.TryAgainError, _UNAVAILABLE),
    (rexc.AskError, _UNAVAILABLE),  # MovedError: a slot moved mid-call
    (rexc.SlotNotCoveredError, _UNAVAILABLE),
    (OSError, _UNAVAILABLE),
    (TimeoutError, _UNAVAILABLE),
    # Everything else is a bug or a misconfiguration: not worth retrying.
    (rexc.ResponseError, _INTERNAL),
    (rexc.RedisError, _INTERNAL),
    (rexc.RedisClusterException, _INTERNAL),
)


def translate_redis_error(exc: BaseException) -> KoreroError:
    """Map a Redis (or socket) failure to the error clients see."""
    kind = next((k for cls, k in REDIS_ERROR_MAP if isinstance(exc, cls)), _INTERNAL)
    if kind == _UNAVAILABLE:
        # An error reply (OOM, READONLY, LOADING, CLUSTERDOWN, MOVED…) means the command
        # did not run; only a reply that never came leaves the outcome unknown.
        refused = isinstance(exc, rexc.ResponseError | rexc.RedisClusterException) or isinstance(
            exc.__cause__ or exc.__context__, ConnectionRefusedError
        )  # nothing listening: the command was never sent
        return StoreUnavailableError(
            f"session store unavailable ({type(exc).__name__})", maybe_applied=not refused
        )
    return KoreroError(
        grpc.StatusCode.INTERNAL, "STORE_ERROR", f"session store error ({type(exc).__name__})"
    )


_CAUGHT = (rexc.RedisError, rexc.RedisClusterException, OSError, TimeoutError)


@asynccontextmanager
async def redis_boundary() -> AsyncIterator[None]:
    """Translate Redis failures raised inside the block (a `KoreroError` passes through)."""
    try:
        yield
    except KoreroError:
        raise
    except _CAUGHT as exc:
        raise translate_redis_error(exc) from exc

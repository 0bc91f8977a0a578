"""Pacing session opens: a burst of new streams waits its turn instead of failing.

Every stream begins with a session open (a create or a resume: one Redis round
trip). Ten thousand clients reconnecting after a failover, or a load test
opening a thousand streams a second, used to send all of those round trips
at once: they queued on the Redis connection pool, and the ones that waited
longer than `KORERO_REDIS_TIMEOUT` for a connection failed with
`UNAVAILABLE` `STORE_UNAVAILABLE` — a failure that says "Redis is down" when
Redis was only busy.

`SessionOpenPacer` lets at most `KORERO_OPENS_IN_FLIGHT` opens run at once in
this process (fewer than the Redis pool holds, so turns in flight keep their
connections); the next `KORERO_OPENS_QUEUE` wait in arrival order, each for at
most the Redis timeout (what it would have waited on the pool). Past the
queue, or after that wait, the open is refused at once with
`RESOURCE_EXHAUSTED` `SESSION_OPENS_BUSY` and a `RetryInfo` delay: about how
long the opens ahead of it take to clear (measured, not guessed), spread over
up to twice that so refused clients do not all come back in the same instant.

In process, like the authentication throttle: it bounds this process's own
Redis traffic and costs no round trip. The conversation engine holds the one
instance and takes a place in `open_session`, after the input is validated, so
every transport (the gRPC `Chat` and `SendMessage` calls, the WebSocket route)
is paced without knowing of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from korero.server.errors import SessionOpensBusyError

__all__ = ["SessionOpenPacer", "SessionOpensBusyError"]

_FIRST_ESTIMATE = 0.005  # seconds per open before any was measured (a local Redis: 1-2 ms)
_SMOOTHING = 0.1  # weight of the newest open in the running average
_MIN_RETRY = 0.05  # seconds: never tell a client to come back sooner
_MAX_RETRY = 10.0  # seconds: nor later


class SessionOpenPacer:
    """At most `in_flight` session opens at once; up to `queue` more wait, in order."""

    def __init__(
        self,
        *,
        in_flight: int,
        queue: int,
        max_wait: float,
        on_refused: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if in_flight < 1 or queue < 0 or max_wait <= 0:
            raise ValueError("in_flight >= 1, queue >= 0 and max_wait > 0")
        self._limit = in_flight
        self._queue_bound = queue
        self._max_wait = max_wait
        self._on_refused = on_refused or (lambda _why: None)
        self._clock = clock
        self._rng = rng or random.Random()
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._per_open = _FIRST_ESTIMATE

    @property
    def running(self) -> int:
        """Opens in flight now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Opens waiting for a place now."""
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the `in_flight` places for the open inside the block.

        Raises `SessionOpensBusyError` when the queue is full or the wait ran out.
        """
        await self._acquire()
        started = self._clock()
        try:
            yield
        finally:
            took = self._clock() - started
            self._per_open += _SMOOTHING * (took - self._per_open)
            self._release()

    def _retry_after(self) -> float:
        """How long the opens ahead would take to clear, spread over up to twice that."""
        ahead = (self._running + len(self._waiters)) / self._limit * self._per_open
        delay = ahead * self._rng.uniform(1.0, 2.0)
        return min(_MAX_RETRY, max(_MIN_RETRY, delay))

    def _refuse(self, why: str) -> SessionOpensBusyError:
        self._on_refused(why)
        return SessionOpensBusyError(self._retry_after(), why)

    async def _acquire(self) -> None:
        if self._running < self._limit and not self._waiters:
            self._running += 1
            return
        if len(self._waiters) >= self._queue_bound:
            raise self._refuse("queue_full")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._max_wait):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # handed a place just as the wait ran out: take it
            self._discard(waiter)
            raise self._refuse("waited_too_long") from None
        except BaseException:  # the client went away while it waited
            if waiter.done() and not waiter.cancelled():
                self._release()  # it was handed a place: pass it on
            else:
                self._discard(waiter)
            raise

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _release(self) -> None:
        """Hand the place to the next waiter still waiting, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place passes on: `_running` stays
                return
        self._running -= 1

"""Delta coalescing: bound the message rate of a streamed answer.

grpcio's asyncio streaming costs far more per message than per byte, so
sending one message per token caps throughput. The first delta of a turn is
sent at once (time to first token is what users feel); later text is merged
until the window has passed since the last send or the buffer is large.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["DeltaCoalescer", "Scheduler"]


class Timer(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """A clock with timers: the running asyncio loop, or a test's fake."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], Any]) -> Timer: ...


class DeltaCoalescer:
    """Merges text pieces and hands them to `emit` at a bounded rate."""

    def __init__(
        self,
        emit: Callable[[str], None],
        window: float,
        max_bytes: int,
        *,
        scheduler: Scheduler | None = None,
    ) -> None:
        self._emit = emit
        self._window = window
        self._max_bytes = max(1, max_bytes)
        self._loop: Scheduler = scheduler or asyncio.get_running_loop()
        self._buffer: list[str] = []
        self._size = 0
        self._last_flush: float | None = None
        self._timer: Timer | None = None

    @property
    def pending(self) -> str:
        """Text received but not yet emitted."""
        return "".join(self._buffer)

    def add(self, text: str) -> None:
        """Take a piece of text; emit now if it is the first or the buffer is full."""
        if not text:
            return
        self._buffer.append(text)
        self._size += len(text)
        if self._last_flush is None or self._size >= self._max_bytes or self._window <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_at(self._last_flush + self._window, self.flush)

    def flush(self) -> None:
        """Emit whatever is buffered, now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        self._last_flush = self._loop.time()
        self._emit(text)

    def close(self) -> None:
        """Drop the timer without emitting (the turn ended another way)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

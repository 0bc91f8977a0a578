"""Events waiting for a client that reads slower than its turn writes: bounded.

A turn publishes into a stream's `OutboundQueue`; the transport takes events
out as fast as the client's HTTP/2 window (or socket buffer) lets it write
them. A client that stops reading must not make the server hold events
without bound, so a queue holds at most `max_events` events and `max_bytes`
bytes of them (`KORERO_STREAM_QUEUE_EVENTS`, `KORERO_STREAM_QUEUE_BYTES`):

1. once the queue is half full, a text delta is merged into a text delta of
   the same turn still waiting at the tail — no text is lost, there are just
   fewer, larger deltas (and the seqs of the merged ones are skipped; seq
   still only increases). Below half, nothing is merged: a client that keeps
   up sees every seq, 1, 2, 3, … (the resume cursor's "no gap");
2. past either bound anyway, the queue drops everything it holds, takes
   nothing more and calls `on_overflow`: the transport ends the stream with
   RESOURCE_EXHAUSTED `STREAM_QUEUE_FULL` (WebSocket: close 1013).

Control signals (end, drain, heartbeat) are not events and are not counted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.server.errors import KoreroError

__all__ = ["OutboundQueue", "StreamWriter", "queue_full"]

_S = TypeVar("_S")
_T = TypeVar("_T")


def queue_full() -> KoreroError:
    """The error that ends a stream whose client stopped reading."""
    return KoreroError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "STREAM_QUEUE_FULL",
        "the client is not reading its events; the stream was ended",
    )


class OutboundQueue(Generic[_S]):
    """A FIFO of events (bounded, deltas merged) and control signals of type `_S`.

    One per open stream, so it is kept small while idle (slots; no deque while
    empty: an empty deque already holds a 64-slot block, ~0.7 KiB per stream).
    """

    __slots__ = ("_bytes", "_events", "_items", "_max_bytes", "_max_events", "_waiter",
                 "on_overflow", "overflowed")  # fmt: skip

    def __init__(
        self,
        max_events: int,
        max_bytes: int,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._items: deque[tuple[pb.Event | _S, int]] | None = None
        self._events = 0
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self.on_overflow = on_overflow
        self.overflowed = False

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def put(self, item: pb.Event | _S) -> None:
        """Queue an event or a signal; never blocks."""
        if self.overflowed:
            return
        size = 0
        if isinstance(item, pb.Event):
            if self._merge(item):
                return
            size = item.ByteSize()
            if self._events + 1 > self._max_events or self._bytes + size > self._max_bytes:
                self._overflow()
                return
            self._events += 1
            self._bytes += size
        if self._items is None:
            self._items = deque()
        self._items.append((item, size))
        self._wake()

    def _merge(self, event: pb.Event) -> bool:
        """Fold a text delta into a text delta of the same turn waiting at the tail,
        once the queue is half full."""
        if not self._items or event.WhichOneof("kind") != "text_delta":  # None or empty
            return False
        if self._events < self._max_events // 2 and self._bytes < self._max_bytes // 2:
            return False
        tail, size = self._items[-1]
        if (
            not isinstance(tail, pb.Event)
            or tail.WhichOneof("kind") != "text_delta"
            or tail.turn_id != event.turn_id
        ):
            return False
        merged = pb.Event()  # a copy: the turn keeps its own events for late subscribers
        merged.CopyFrom(event)
        merged.text_delta.text = tail.text_delta.text + event.text_delta.text
        grown = merged.ByteSize()
        if self._bytes - size + grown > self._max_bytes:
            self._overflow()
            return True
        self._items[-1] = (merged, grown)
        self._bytes += grown - size
        return True

    def _overflow(self) -> None:
        self.overflowed = True
        self._items = None
        self._events = self._bytes = 0
        self._wake()
        if self.on_overflow is not None:
            self.on_overflow()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> pb.Event | _S | None:
        """The next item, waiting for one; None once the queue has overflowed."""
        while not self._items:
            if self.overflowed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item, size = self._items.popleft()
        if not self._items:
            self._items = None  # idle again: give the deque's block back
        if isinstance(item, pb.Event):
            self._events -= 1
            self._bytes -= size
        return item


class StreamWriter(Generic[_T]):
    """Sends a stream's messages; a send blocked by a client that stopped reading can be
    interrupted (`interrupt`), so the transport can end the stream instead of waiting.

    Interrupting cancels the sending task only while it waits inside `send`,
    where the cancellation then surfaces; `write` absorbs it and says False.
    """

    __slots__ = ("_send", "_sending", "_task", "interrupted")

    def __init__(self, send: Callable[[_T], Awaitable[None]]) -> None:
        self._send = send
        self._task = asyncio.current_task()
        self._sending = False
        self.interrupted = False

    async def write(self, message: _T) -> bool:
        """Send `message`; False if interrupted (end the stream now)."""
        if self.interrupted:
            return False
        self._sending = True
        try:
            await self._send(message)
        except asyncio.CancelledError:
            if not self.interrupted or self._task is None or self._task.uncancel() > 0:
                raise  # cancelled by someone else too (the client went away)
            return False
        finally:
            self._sending = False
        return True

    def interrupt(self) -> None:
        if self.interrupted:
            return
        self.interrupted = True
        if self._sending and self._task is not None:
            self._task.cancel()

"""The Chat rules of one live session, shared by every full-duplex transport.

(A little over 400 lines: these are the rules of one stream, kept in one place
so that the gRPC and WebSocket transports cannot drift apart.)

The gRPC `Chat` stream and the WebSocket adapter both open a session with the
engine and then hand each decoded `ChatRequest` to a `ChatSession`; they send
whatever `outbound()` yields, in their own framing. So the rules live here
once: one turn at a time (a resend of the message in flight is ignored, any
other message is refused with `TURN_IN_FLIGHT`), `cancel`, refusals that
repeat the last seq, heartbeats on a quiet stream, and draining (an idle
session ends at once, a busy one after its turn's terminal event).

Resume: a stream opened with a cursor first sends the logged events after it,
then joins the turn in flight (here or on another instance). Its seq never
goes backwards: a turn event at or below the last one sent is not sent again.
A stream that ends with a turn in flight detaches from it; the engine cancels
the turn only when no stream comes back within the detach grace.

Handoff (handoff/): the session also follows its relay feed, so handoff
events and the agent's messages arrive on the same stream in seq order,
never in the middle of a bot turn (and not twice after a replay); `handoff`
(the client asking for a person) is handled here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.server.conversation.engine import ConversationEngine, OpenedSession, Turn
from korero.server.conversation.hooks import RelayFeed
from korero.server.conversation.wire import error_event_body
from korero.server.errors import InvalidArgumentError, KoreroError
from korero.server.settings import ServerSettings
from korero.server.transport.outbound import OutboundQueue, queue_full

__all__ = ["ChatSession", "StreamRules", "cursor_of", "read_first_frame"]


def cursor_of(start: pb.StartSession) -> int | None:
    """The resume cursor of a `start` frame (None when not set)."""
    return start.after_seq if start.HasField("after_seq") else None


@dataclass(frozen=True)
class StreamRules:
    """The timing rules of a full-duplex chat stream, whatever carries it."""

    heartbeat_interval: float
    first_frame_timeout: float
    queue_events: int = 64
    """Most events waiting for a client that does not read (see outbound.py)."""
    queue_bytes: int = 65536
    """Most bytes of events waiting for a client that does not read."""

    @classmethod
    def from_settings(cls, server: ServerSettings) -> StreamRules:
        return cls(
            heartbeat_interval=server.heartbeat_interval,
            first_frame_timeout=server.first_frame_timeout,
            queue_events=server.stream_queue_events,
            queue_bytes=server.stream_queue_bytes,
        )

    def outbound_queue(self) -> OutboundQueue[Any]:
        """A bounded queue for one stream's events."""
        return OutboundQueue(self.queue_events, self.queue_bytes)


async def read_first_frame(
    receive: Callable[[], Awaitable[pb.ChatRequest | None]], within: float, stream: str
) -> pb.ChatRequest:
    """The first frame of a stream, which must be `start` and arrive within `within` seconds.

    `receive` returns None when the client closed first; `stream` names the
    stream in messages ("Chat stream", "chat socket").
    """
    try:
        async with asyncio.timeout(within):
            first = await receive()
    except TimeoutError:
        raise KoreroError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "FIRST_FRAME_TIMEOUT",
            f"no start frame within {within:g}s",
        ) from None
    if first is None:
        raise InvalidArgumentError(
            "FIRST_FRAME_MISSING", f"the {stream} closed before its first frame (start)"
        )
    if first.WhichOneof("kind") != "start":
        raise InvalidArgumentError(
            "FIRST_FRAME_NOT_START", f"the first frame of a {stream} must be `start`"
        )
    return first


_TERMINAL = frozenset({"done", "error"})
RELAYED = frozenset(
    {
        "handoff_requested",
        "handoff_queued",
        "agent_joined",
        "agent_message",
        "agent_left",
        "handoff_ended",
        "message_relayed",
    }
)
"""Events from the session's relay feed (handoff/), numbered like every event."""


class _Signal:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_DRAIN = _Signal("drain")
_HEARTBEAT = _Signal("heartbeat")
_END = _Signal("end")


def _nothing() -> None:
    return None


class ChatSession:
    """One session being talked to over a full-duplex transport."""

    # One per open stream (10,000s of them): slots, and no closures of its own.
    # Keep this list in step with the attributes `__init__` and the methods set.
    __slots__ = ("__weakref__", "_deadline", "_engine", "_feed", "_heartbeat", "_interval",
                 "_loop", "_out", "_requests", "_resume", "_sent_at", "draining", "failure",
                 "last_seq", "on_overflow", "session_id", "tenant", "turn")  # fmt: skip

    def __init__(
        self,
        engine: ConversationEngine,
        tenant: str,
        opened: OpenedSession,
        rules: StreamRules,
        deadline: Callable[[], float | None] = lambda: None,
    ) -> None:
        self._engine = engine
        self.tenant = tenant
        self.session_id = opened.session_id
        self.last_seq = opened.started.seq
        self.turn: Turn | None = None
        self.draining = False
        """Set once the server started draining; the transport then says goodbye."""
        self.failure: KoreroError | None = None
        """Set when the reader failed (e.g. an undecodable frame): the transport ends
        the stream with it after the events already queued."""
        self.on_overflow: Callable[[], None] = _nothing
        """Called when the client stopped reading and the queue overflowed: the
        transport interrupts its blocked write and ends the stream."""
        self._deadline = deadline
        self._out: OutboundQueue[_Signal] = rules.outbound_queue()
        self._out.on_overflow = self._overflowed
        self._interval = rules.heartbeat_interval
        self._loop = asyncio.get_running_loop()
        self._sent_at = self._loop.time()  # the last time anything was sent
        self._heartbeat = self._loop.call_later(self._interval, self._tick)
        self._resume: OpenedSession | None = None
        if opened.started.session_started.HasField("replay"):
            self._resume = opened  # replayed by `outbound()`, outside the bounded queue
        self._feed: RelayFeed | None = None
        self._requests: set[asyncio.Task[None]] | None = None  # made on first use
        handoff = engine.handoff
        if handoff is not None:
            self._feed = handoff.feed(
                tenant, self.session_id, opened.started.seq, self._out.put, self._turn_wait
            )

    def _turn_wait(self) -> asyncio.Future[None] | None:
        """What relay events wait for: the end of the bot turn in flight, if any."""
        turn = self.turn
        if turn is None or turn.done:
            return None
        return asyncio.ensure_future(turn.wait())

    @property
    def overflowed(self) -> bool:
        """The client stopped reading and its queue overflowed."""
        return self._out.overflowed

    @property
    def turn_in_flight(self) -> bool:
        return self.turn is not None and not self.turn.done

    def rejection(self, error: KoreroError, client_message_id: str = "") -> pb.Event:
        """An error outside any turn: not part of the resumable log, so it repeats the seq."""
        return pb.Event(
            session_id=self.session_id,
            seq=self.last_seq,
            error=error_event_body(error, client_message_id),
        )

    def _sink(self, event: pb.Event) -> None:
        if self._feed is not None and event.WhichOneof("kind") == "message_relayed":
            return  # it comes through the relay feed, in order with the agent's messages
        self._out.put(event)

    def _overflowed(self) -> None:
        """The client stopped reading: stop the turn now (its outcome is stored as
        failed), and let the transport end the stream."""
        self.fail(queue_full())
        if self.turn is not None and not self.turn.done:
            self.turn.unsubscribe(self._sink)
            self.turn.cancel(error=queue_full())
        self.on_overflow()

    def _tick(self) -> None:
        """A heartbeat once the stream has been quiet for the interval (not up to twice it);
        none for a client that is not reading (no pile)."""
        quiet = self._loop.time() - self._sent_at
        if quiet >= self._interval * 0.999:
            if not len(self._out):
                self._out.put(_HEARTBEAT)
            self._sent_at = self._loop.time()
            quiet = 0.0
        self._heartbeat = self._loop.call_later(self._interval - quiet, self._tick)

    # Inbound ------------------------------------------------------------------

    async def handle(self, request: pb.ChatRequest) -> None:
        """Act on one request frame after the first."""
        kind = request.WhichOneof("kind")
        if kind == "message":
            await self._on_message(request.message)
        elif kind == "cancel":
            turn = self.turn
            wanted = request.cancel.turn_id
            if turn is not None and (not wanted or wanted == turn.turn_id):
                turn.cancel()
        elif kind == "handoff":
            task = asyncio.create_task(self._on_handoff(request.handoff))
            if self._requests is None:
                self._requests = set()
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
        elif kind == "start":
            self._out.put(
                self.rejection(
                    InvalidArgumentError(
                        "SESSION_ALREADY_STARTED", "`start` is only valid as the first frame"
                    )
                )
            )
        else:
            self._out.put(
                self.rejection(InvalidArgumentError("REQUEST_EMPTY", "the request sets no kind"))
            )

    async def _on_handoff(self, request: pb.RequestHandoff) -> None:
        """The client asks for a person (end the bot's turn in flight, then hand over),
        or withdraws that request while it waits in the queue."""
        handoff = self._engine.handoff
        try:
            if handoff is None:
                raise KoreroError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "HANDOFF_UNAVAILABLE",
                    "handing over to a human is not available here",
                )
            if request.withdraw:
                if not await handoff.withdraw(self.tenant, self.session_id):
                    raise KoreroError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "HANDOFF_NOT_WAITING",
                        "no request for a person is waiting in the queue",
                    )
                return
            turn = self.turn
            if turn is not None and not turn.done:
                turn.cancel()
                await turn.wait()
            await handoff.request(self.tenant, self.session_id, request.reason)
        except KoreroError as error:
            self._out.put(self.rejection(error))

    async def _on_message(self, message: pb.UserMessage) -> None:
        current = self.turn
        if current is not None and not current.done:
            if current.client_message_id == message.client_message_id:
                return  # a resend of the message being answered on this very stream
            self._out.put(
                self.rejection(
                    InvalidArgumentError(
                        "TURN_IN_FLIGHT",
                        f"turn {current.turn_id} is still in flight; "
                        "wait for it to end or cancel it",
                    ),
                    message.client_message_id,
                )
            )
            return
        if self.draining:
            return
        try:
            if self._feed is not None and self._feed.active:
                # Relay events not yet delivered go before this message's events.
                await self._feed.catch_up()
                # A person may own the session now: no early upstream request (early.py).
                self._engine.forget_early(self.tenant, self.session_id)
            self.turn = await self._engine.start_turn(
                self.tenant, self.session_id, message, self._sink, self._deadline()
            )
        except KoreroError as error:
            self._out.put(self.rejection(error, message.client_message_id))

    async def finish(self) -> None:
        """The client sent its last frame: end once the turn in flight has ended."""
        if self.turn is not None:
            await self.turn.wait()
        self._out.put(_END)

    def end(self) -> None:
        """The client is gone: end the outbound stream now."""
        self._out.put(_END)

    def fail(self, error: KoreroError) -> None:
        """The stream cannot go on (its reader failed): end it with `error`."""
        if self.failure is None:
            self.failure = error
        self._out.put(_END)

    def drain(self) -> None:
        """The server is draining: end now if idle, else after the turn's terminal event."""
        self._out.put(_DRAIN)

    # Outbound -----------------------------------------------------------------

    def _join(self, opened: OpenedSession) -> None:
        self.turn = self._engine.join_live(
            self.tenant,
            self.session_id,
            opened.inflight,
            opened.cursor,
            self._sink,
            self._deadline(),
            opened.inflight_cmid,
        )

    async def _replayed(self) -> AsyncIterator[pb.Event]:
        """On a resume from a cursor: the missed events, as logged (never merged or
        dropped), then the turn in flight joined live (before the last one goes out,
        so a client that has caught up finds the turn already followed)."""
        opened, self._resume = self._resume, None
        if opened is None:
            return
        missed = [e for e in opened.missed if e.seq > self.last_seq]
        for index, event in enumerate(missed):
            if index == len(missed) - 1:
                self._join(opened)
            self._sent_at = self._loop.time()
            self.last_seq = event.seq
            yield event
        if not missed:
            self._join(opened)

    async def outbound(self) -> AsyncIterator[pb.Event]:
        """Events to send, until the client is done or the server drains."""
        async for event in self._replayed():
            yield event
        while True:
            item = await self._out.get()
            if item is None:  # overflowed: `failure` says so
                return
            if isinstance(item, _Signal):
                if item is _END:
                    return
                if item is _HEARTBEAT:
                    yield pb.Event(
                        session_id=self.session_id, seq=self.last_seq, heartbeat=pb.Heartbeat()
                    )
                    continue
                self.draining = True  # _DRAIN
                if not self.turn_in_flight:
                    return
                continue
            if (item.turn_id or item.WhichOneof("kind") in RELAYED) and item.seq <= self.last_seq:
                continue  # already sent (a replay overlapping the live turn): never backwards
            self._sent_at = self._loop.time()
            self.last_seq = max(self.last_seq, item.seq)
            yield item
            if self.draining and item.WhichOneof("kind") in _TERMINAL:
                return

    def close(self) -> None:
        """Stop the heartbeat; detach from a turn still in flight (cancelled after the grace,
        which stops the upstream call, unless a stream resumes it)."""
        self._heartbeat.cancel()
        if self._feed is not None:
            self._feed.close()
        for task in self._requests or ():
            task.cancel()
        if self.turn is not None and not self.turn.done:
            self._engine.detach(self.turn, self._sink)

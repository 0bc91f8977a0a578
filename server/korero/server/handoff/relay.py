"""Relaying between a customer's stream and an agent's desk, across instances.

Every handoff event and relayed message is appended to the session's relay
log in Redis (a stream, each entry carrying the session `seq` it was given)
and announced on the session's channel. Each server instance holds one
pattern subscription (`RelayHub`) that hears every session and desk channel
and wakes the local listeners; a listener then reads the log from its own
cursor. Pub/sub only says "look"; the log is what is delivered, so a missed
announcement (a reconnect, a slow instance) loses nothing: after
(re)subscribing the hub wakes everyone, and every reader catches up.

`SessionFeed` is the customer side: it forwards the log's customer-facing
events to one Chat stream, in seq order, holding them back while a bot turn
is still streaming (so `seq` never goes backwards on the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
import redis.exceptions as rexc

from korero.chat.v1 import chat_pb2 as pb
from korero.server.errors import KoreroError
from korero.server.handoff.records import RelayEntry
from korero.server.handoff.store import HandoffStore
from korero.server.storage.keys import NOTIFY_PATTERN, parse_notify_channel

__all__ = ["RelayHub", "SessionFeed"]

log = logging.getLogger(__name__)

Wake = Callable[[], None]
_RECONNECT_DELAY = (0.1, 0.5, 1.0, 2.0)


class RelayHub:
    """One pattern subscription per instance, fanned out to local listeners."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        # Lists, not sets: one listener per key is the rule, and a one-item list is a
        # quarter of a one-item set (every open customer stream has a key here).
        self._listeners: dict[tuple[str, str | None], list[Wake]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self._tried = asyncio.Event()

    async def start(self, within: float = 5.0) -> None:
        """Subscribe; returns once the first attempt has succeeded or failed (at most
        `within` seconds), retrying behind: an instance whose Redis is down starts at once
        and serves health."""
        self._task = asyncio.create_task(self._run(), name="relay-hub")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tried.wait(), within)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=2.0)  # bounded: shutdown never hangs here
            self._task = None

    def watch(self, tenant: str, session_id: str | None, wake: Wake) -> None:
        """Call `wake` on every announcement for the session (None: the tenant's desk)."""
        self._listeners[(tenant, session_id)].append(wake)

    def unwatch(self, tenant: str, session_id: str | None, wake: Wake) -> None:
        key = (tenant, session_id)
        listeners = self._listeners.get(key)
        if listeners is not None:
            with contextlib.suppress(ValueError):
                listeners.remove(wake)
            if not listeners:
                del self._listeners[key]

    def _wake(self, key: tuple[str, str | None]) -> None:
        for wake in tuple(self._listeners.get(key, ())):
            wake()

    def _wake_all(self) -> None:
        for key in list(self._listeners):
            self._wake(key)

    async def _run(self) -> None:
        attempt = 0
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(NOTIFY_PATTERN)
                attempt = 0
                self.ready.set()
                self._tried.set()
                self._wake_all()  # whatever was announced while we were not listening
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    channel = message["channel"]
                    parsed = parse_notify_channel(
                        channel.decode() if isinstance(channel, bytes) else channel
                    )
                    if parsed is not None:
                        self._wake(parsed)
            except (rexc.RedisError, OSError) as exc:
                self._tried.set()
                delay = _RECONNECT_DELAY[min(attempt, len(_RECONNECT_DELAY) - 1)]
                attempt += 1
                log.warning(
                    "event=relay_hub_reconnect error=%s delay=%.1f", type(exc).__name__, delay
                )
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), 1.0)  # type: ignore[no-untyped-call]


class SessionFeed:
    """Forwards a session's relay log to one customer stream, in order.

    Every open customer stream has one, so an idle feed is kept small (slots; its
    task, event and lock are made on first use): bench/README.md, "Per idle stream".
    """

    __slots__ = (
        "_after_seq",
        "_busy",
        "_cursor",
        "_deliver",
        "_hub",
        "_lock",
        "_session_id",
        "_store",
        "_task",
        "_tenant",
        "_wanted",
        "active",
    )

    def __init__(
        self,
        *,
        store: HandoffStore,
        hub: RelayHub,
        tenant: str,
        session_id: str,
        after_seq: int,
        deliver: Callable[[pb.Event], None],
        busy: Callable[[], Awaitable[None] | None],
    ) -> None:
        self._store = store
        self._hub = hub
        self._tenant = tenant
        self._session_id = session_id
        self._after_seq = after_seq
        self._cursor = "0"
        self._deliver = deliver
        self._busy = busy
        self._wanted: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self.active = False
        """The session has had relay traffic since this stream opened."""
        hub.watch(tenant, session_id, self._wake)

    def _wake(self) -> None:
        if self._wanted is None:  # started on first use: idle streams cost no task
            self._wanted = asyncio.Event()
            self._task = asyncio.create_task(
                self._follow(self._wanted), name=f"feed-{self._session_id}"
            )
        self._wanted.set()

    async def _follow(self, wanted: asyncio.Event) -> None:
        while True:
            await wanted.wait()
            wanted.clear()
            wait = self._busy()
            if wait is not None:  # a bot turn is streaming: its events go first
                await wait
            try:
                await self.catch_up()
            except KoreroError as error:
                log.warning("event=relay_read_failed reason=%s", error.reason)
                await asyncio.sleep(0.5)
                wanted.set()

    async def catch_up(self) -> None:
        """Deliver every customer-facing entry not delivered yet."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while True:
                entries = await self._store.read_relay(self._tenant, self._session_id, self._cursor)
                if not entries:
                    return
                for entry in entries:
                    self._forward(entry)
                self._cursor = entries[-1].entry_id

    def _forward(self, entry: RelayEntry) -> None:
        self.active = True
        if not entry.event or entry.seq <= self._after_seq:
            return
        event = pb.Event.FromString(entry.event)
        event.seq = entry.seq
        self._after_seq = entry.seq
        self._deliver(event)

    def close(self) -> None:
        self._hub.unwatch(self._tenant, self._session_id, self._wake)
        if self._task is not None:
            self._task.cancel()

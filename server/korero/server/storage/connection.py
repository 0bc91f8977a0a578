"""Connecting to Redis: one server, or a Redis Cluster, chosen by the URL.

    redis://host:6379/0, rediss://…, unix://…   one server, over a blocking pool
    redis+cluster://host:7000[,host:7001…]       Redis Cluster (seed nodes; the
    rediss+cluster://…                            client reads the slot map)

Everything else in Kōrero is written against `redis.asyncio.Redis`; the
cluster client (`redis.asyncio.cluster.RedisCluster`) offers the same
command API for what Kōrero sends — single-key commands, EVALSHA with its
keys, non-transactional pipelines — so it is handed out under that type.
What makes that safe on a cluster:

- every key carries a `{tenant:…}` hash tag (`keys.py`), so the keys one
  Lua script touches share a slot and no script is CROSSSLOT;
- a pipeline mixing slots (a session's script plus the tenant's cache
  probe) is split by redis-py per node and the parts are sent at the same
  time, so it still costs one round trip of wall time;
- a script the node does not know (NOSCRIPT) is loaded and re-run by
  `scripts.run_scripts`, per call, on the node that owns its slot;
- while a primary fails over (from its failure until a replica is promoted:
  about `cluster-node-timeout` plus a second), a command that certainly did
  not run — the connection could not be opened, or a node refused it with
  CLUSTERDOWN/TRYAGAIN/READONLY — is sent again every 0.25 s with a fresh
  slot map for up to `KORERO_REDIS_FAILOVER_WAIT` seconds, then fails as
  `STORE_UNAVAILABLE`. A command whose connection died after it was written
  is never sent again (it may have run, and reached the replica): it fails
  as `STORE_UNAVAILABLE` at once. redis-py's own retries are off, because
  they do resend those.

redis-py's cluster client fails with `MaxConnectionsError` when a node's
connections are all in use; the single-server pool here waits instead (the
pitfall in DESIGN.md). `_WaitingCluster` restores that: at most
`max_connections` commands or pipelines run at once, and the rest wait up to
the Redis timeout, then fail as `STORE_UNAVAILABLE` like any other outage.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, parse_url
from redis.backoff import NoBackoff
from redis.retry import Retry

from korero.server.settings import RedisSettings

__all__ = ["CLUSTER_SCHEMES", "connect", "connect_subscriber", "is_cluster_url"]

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL scheme selecting Redis Cluster -> the scheme of each node's connection."""

_FAILOVER_PAUSE = 0.25
"""Seconds between our retries while a primary fails over."""
_REFUSED = (
    rexc.ClusterDownError,  # between a primary's failure and its replica's promotion
    rexc.SlotNotCoveredError,
    rexc.TryAgainError,
    rexc.ReadOnlyError,  # a demoted primary, until the slot map is re-read
)
"""Replies by which a node refused a command: it did not run."""


def _did_not_run(exc: BaseException) -> bool:
    """Whether a failed command certainly did not run, so sending it again is safe.

    A node that refused it said so; a connection that could not be opened
    sent nothing (redis-py words those "…connecting to…"). A connection lost
    after the command was written leaves its outcome unknown: it may have run
    (and reached the replica), so it is not sent again — that would run a
    turn's begin or finish script twice.
    """
    if isinstance(exc, rexc.MaxConnectionsError):
        return False
    if isinstance(exc, _REFUSED):
        return True
    return isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError)) and (
        "connecting to" in str(exc)
    )


_HOLDING: contextvars.ContextVar[bool] = contextvars.ContextVar("korero_redis_slot", default=False)
_HOLDING_RETRY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "korero_redis_retrying", default=False
)
_T = TypeVar("_T")


def is_cluster_url(url: str) -> bool:
    """Whether `url` names a Redis Cluster (`redis+cluster://`, `rediss+cluster://`)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def connect(settings: RedisSettings, *, socket_timeout: float | None = None) -> aioredis.Redis:
    """A client for `settings.url`: a blocking pool, or a cluster client that waits.

    `socket_timeout` overrides the per-call timeout (long ingests in the CLI).
    """
    timeout = settings.timeout if socket_timeout is None else socket_timeout
    if not is_cluster_url(settings.url):
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=settings.max_connections,
            timeout=settings.timeout,
            socket_timeout=timeout,
            socket_connect_timeout=settings.timeout,
        )
        return aioredis.Redis(connection_pool=pool)
    scheme, netloc, path, query, fragment = urlsplit(settings.url)
    credentials, _, hosts = netloc.rpartition("@")
    seeds = [h.strip() for h in hosts.split(",") if h.strip()]
    if not seeds:
        raise ValueError("a redis+cluster:// URL names at least one node")
    first = urlunsplit(
        (
            CLUSTER_SCHEMES[scheme.lower()],
            f"{credentials}@{seeds[0]}" if credentials else seeds[0],
            path,
            query,
            fragment,
        )
    )
    options: dict[str, Any] = dict(parse_url(first))
    if options.pop("db", 0):
        raise ValueError("Redis Cluster has only database 0")
    if options.pop("connection_class", None) is aioredis.SSLConnection:
        options["ssl"] = True
    host, port = options.pop("host"), options.pop("port", 6379)
    startup = [ClusterNode(host, port)] + [_node(seed) for seed in seeds[1:]]
    client = _WaitingCluster(
        startup_nodes=startup,
        max_connections=settings.max_connections,
        socket_timeout=timeout,
        socket_connect_timeout=settings.timeout,
        retry=Retry(NoBackoff(), 0),  # ours instead: see _did_not_run
        # Serve the slots that are up while a primary fails over (with the
        # servers' cluster-require-full-coverage no, docs/scaling.md).
        require_full_coverage=False,
        wait_timeout=settings.timeout,
        failover_wait=settings.failover_wait,
        **options,
    )
    # Same command API for what Kōrero sends (see the module docstring).
    return cast(aioredis.Redis, client)


def connect_subscriber(settings: RedisSettings) -> aioredis.Redis:
    """One connection for pub/sub, without a read timeout (it idles by design).

    On a Redis Cluster, classic PUBLISH/SUBSCRIBE messages reach every node,
    so the subscriber talks to one node: the first seed of the URL. (If that
    node is down, the subscriber's own reconnect loop keeps trying it; name
    several seeds and put a stable one first.)
    """
    url = settings.url
    if is_cluster_url(url):
        scheme, netloc, _, query, fragment = urlsplit(url)
        credentials, _, hosts = netloc.rpartition("@")
        first = hosts.split(",")[0].strip()
        url = urlunsplit(
            (
                CLUSTER_SCHEMES[scheme.lower()],
                f"{credentials}@{first}" if credentials else first,
                "",
                query,
                fragment,
            )
        )
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=settings.timeout, health_check_interval=30
    )


def _node(seed: str) -> ClusterNode:
    host, _, port = seed.rpartition(":")
    return ClusterNode(host.strip("[]") or "127.0.0.1", int(port or 6379))


class _CheckedConnection(Connection):
    """A pooled connection the server has already closed (it died, or failed over)
    is reopened before a command is written to it, so that command's failure
    is a refused connect — known not to have run — rather than an unknown."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._reader is not None and self._reader.at_eof():
            await self.disconnect(nowait=True)
        await super().send_packed_command(command, check_health)


class _CheckedSSLConnection(SSLConnection, _CheckedConnection):
    """The same, over TLS (rediss+cluster://)."""


class _WaitingCluster(RedisCluster):
    """A cluster client whose callers wait for a connection instead of failing,
    and whose calls ride out a primary's failover (see the module docstring)."""

    def __init__(self, *, wait_timeout: float, failover_wait: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        checked = _CheckedSSLConnection if kwargs.get("ssl") else _CheckedConnection
        self.connection_kwargs["connection_class"] = checked  # nodes found later
        for node in self.startup_nodes:
            node.connection_class = checked
        self._free = asyncio.Semaphore(kwargs["max_connections"])
        self._wait_timeout = wait_timeout
        self.failover_wait = failover_wait

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold one of `max_connections` places (re-entrant within one call)."""
        if _HOLDING.get():
            yield
            return
        try:
            async with asyncio.timeout(self._wait_timeout):
                await self._free.acquire()
        except TimeoutError:
            raise rexc.ConnectionError("no Redis Cluster connection free in time") from None
        token = _HOLDING.set(True)
        try:
            yield
        finally:
            _HOLDING.reset(token)
            self._free.release()

    async def riding_failover(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """`attempt()`, again every 0.25 s on a topology error, for up to `failover_wait` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.failover_wait
        while True:
            try:
                return await attempt()
            except rexc.RedisError as exc:
                if not _did_not_run(exc) or loop.time() + _FAILOVER_PAUSE > deadline:
                    raise
                # Re-read the slot map, not from the node that may have died.
                self._initialize = True
                self.replace_default_node()
            await asyncio.sleep(_FAILOVER_PAUSE)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            if _HOLDING_RETRY.get():  # inside a pipeline's or a command's retry already
                return await super().execute_command(*args, **kwargs)
            token = _HOLDING_RETRY.set(True)
            try:
                return await self.riding_failover(
                    lambda: _once(super(_WaitingCluster, self).execute_command(*args, **kwargs))
                )
            finally:
                _HOLDING_RETRY.reset(token)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise rexc.RedisClusterException("shard_hint is not supported in cluster mode")
        return _WaitingPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py's own


class _WaitingPipeline(ClusterPipeline):
    """A cluster pipeline that holds one place of its client while it runs; the
    commands that certainly did not run are sent again (only they: the others
    have their replies, or an unknown outcome) while a primary fails over."""

    async def initialize(self) -> ClusterPipeline:
        """Read the slot map if needed (the node it is read from may be failing over)."""
        client = cast(_WaitingCluster, self.cluster_client)
        await client.riding_failover(lambda: super(_WaitingPipeline, self).initialize())
        return self

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self.__dict__.setdefault("_queued", []).append((args, dict(kwargs)))
        return super().execute_command(*args, **kwargs)

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = cast(_WaitingCluster, self.cluster_client)
        queued: list[tuple[tuple[Any, ...], dict[str, Any]]] = self.__dict__.pop("_queued", [])
        results: list[Any] = [None] * len(queued)
        pending = list(range(len(queued)))
        attempts = 0

        async def attempt() -> list[Any]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # the failed attempt emptied the queue
                for i in pending:
                    args, kwargs = queued[i]
                    super(_WaitingPipeline, self).execute_command(*args, **dict(kwargs))
            replies = await super(_WaitingPipeline, self).execute(False, allow_redirections)
            for i, reply in zip(list(pending), replies, strict=True):
                results[i] = reply
            pending[:] = [
                i for i in pending if isinstance(results[i], Exception) and _did_not_run(results[i])
            ]
            if pending:
                raise results[pending[0]]
            return results

        async with client.turn():
            token = _HOLDING_RETRY.set(True)  # commands re-sent inside are not retried twice
            try:
                await client.riding_failover(attempt)
            except rexc.RedisError as exc:
                if raise_on_error or not any(reply is exc for reply in results):
                    raise  # the pipeline itself failed, not some of its commands
            finally:
                _HOLDING_RETRY.reset(token)
        if raise_on_error:
            for reply in results:
                if isinstance(reply, Exception):
                    raise reply
        return results


async def _once(call: Awaitable[_T]) -> _T:
    return await call

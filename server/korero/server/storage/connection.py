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
  `scripts.run_scripts`, per call, on the node that owns its slot.

redis-py's cluster client fails with `MaxConnectionsError` when a node's
connections are all in use; the single-server pool here waits instead (the
pitfall in DESIGN.md). `_WaitingCluster` restores that: at most
`max_connections` commands or pipelines run at once, and the rest wait up to
the Redis timeout, then fail as `STORE_UNAVAILABLE` like any other outage.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import parse_url
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from korero.server.settings import RedisSettings

__all__ = ["CLUSTER_SCHEMES", "connect", "is_cluster_url"]

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL scheme selecting Redis Cluster -> the scheme of each node's connection."""

_CLUSTER_RETRIES = 6
"""Topology errors (a node gone, CLUSTERDOWN, a slot moving) retried with a fresh
slot map: with the backoff below that rides out a failover of about 3 s."""
_BACKOFF = ExponentialWithJitterBackoff(cap=1.0, base=0.1)

_HOLDING: contextvars.ContextVar[bool] = contextvars.ContextVar("korero_redis_slot", default=False)


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
        retry=Retry(_BACKOFF, _CLUSTER_RETRIES),
        wait_timeout=settings.timeout,
        **options,
    )
    # Same command API for what Kōrero sends (see the module docstring).
    return cast(aioredis.Redis, client)


def _node(seed: str) -> ClusterNode:
    host, _, port = seed.rpartition(":")
    return ClusterNode(host.strip("[]") or "127.0.0.1", int(port or 6379))


class _WaitingCluster(RedisCluster):
    """A cluster client whose callers wait for a connection instead of failing."""

    def __init__(self, *, wait_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._free = asyncio.Semaphore(kwargs["max_connections"])
        self._wait_timeout = wait_timeout

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

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise rexc.RedisClusterException("shard_hint is not supported in cluster mode")
        return _WaitingPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py's own


class _WaitingPipeline(ClusterPipeline):
    """A cluster pipeline that holds one place of its client while it runs."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        async with cast(_WaitingCluster, self.cluster_client).turn():
            return await super().execute(raise_on_error, allow_redirections)

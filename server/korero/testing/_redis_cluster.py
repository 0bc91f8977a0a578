"""A private Redis Cluster on free loopback ports, for tests and benchmarks.

Three primaries (and optionally one replica each), each a `redis-server
--cluster-enabled yes` without persistence, joined by `redis-cli --cluster
create`. The same shape as `RedisProcess` in conftest (`url`, `client()`,
`stop()`), plus what failover tests need: which node owns a key, killing a
node, waiting for the cluster to be whole again.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from korero.testing._redis import spawn_redis, wait_ping

__all__ = ["PrivateRedisCluster"]

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"

NODE_TIMEOUT_MS = 1000
"""cluster-node-timeout: a primary unreachable this long is failed over."""


def _free_port() -> int:
    # Cluster nodes also listen on port + 10000 (the bus): keep both free.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass
class ClusterNodeProcess:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn_redis(
            self.port,
            self.workdir,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{self.port}.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            "--logfile",
            "redis.log",
            # A replica's first sync starts at once (the default waits 5 s
            # for more replicas): until it is done it cannot take over.
            "--repl-diskless-sync-delay",
            "0",
            # While a primary is down, the others keep serving their slots
            # (as docs/scaling.md recommends for Kōrero).
            "--cluster-require-full-coverage",
            "no",
        )

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


@dataclass
class PrivateRedisCluster:
    """A local Redis Cluster: `primaries` primaries with `replicas` replicas each."""

    workdir: Path
    primaries: int = 3
    replicas: int = 0
    nodes: list[ClusterNodeProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])
        return f"redis+cluster://{seeds}"

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def start(self) -> None:
        count = self.primaries * (1 + self.replicas)
        self.nodes = [
            ClusterNodeProcess(port, self.workdir / str(port))
            for port in (_free_port() for _ in range(count))
        ]
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            wait_ping(node.port)
        subprocess.run(  # noqa: S603 - our own argv, no shell
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
        )
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> float:
        """Wait until every live node says cluster_state:ok and agrees on the primaries.

        Returns the seconds waited.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            try:
                if self._healthy():
                    return time.monotonic() - started
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not become healthy")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        """Every live node: state ok, all slots served by live primaries, the same
        view of who the primaries are, and each replica's link to its primary up."""
        live = [n for n in self.nodes if n.proc is not None]
        live_ports = {n.port for n in live}
        views = set()
        for node in live:
            with node.client() as c:
                info = c.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
                primaries = tuple(sorted(self._primary_ports(c)))
                if not set(primaries) <= live_ports:
                    return False
                views.add(primaries)
                replication = c.info("replication")
                if (
                    replication.get("role") == "slave"
                    and replication.get("master_port") in live_ports
                    and replication.get("master_link_status") != "up"
                ):
                    return False
        return len(views) == 1

    @staticmethod
    def _primary_ports(client: redis.Redis) -> list[int]:
        raw = client.execute_command("CLUSTER", "NODES").decode()  # type: ignore[no-untyped-call]
        ports = []
        for line in raw.splitlines():
            parts = line.split()
            if "master" in parts[2] and "fail" not in parts[2] and parts[8:]:
                ports.append(int(parts[1].split(":")[1].split("@")[0]))
        return ports

    def primary_of(self, key: str) -> ClusterNodeProcess:
        """The node that serves `key`'s slot now."""
        live = next(n for n in self.nodes if n.proc is not None)
        with live.client() as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(key)

    def client(self) -> RedisCluster:
        live = next(n for n in self.nodes if n.proc is not None)
        return _WholeCluster(host="127.0.0.1", port=live.port, socket_timeout=5)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class _WholeCluster(RedisCluster):
    """A sync cluster client whose KEYS looks at every primary, as on one server."""

    def keys(self, pattern: str = "*", **kwargs: object) -> list[bytes]:  # type: ignore[override]
        replies = super().keys(pattern, target_nodes=RedisCluster.PRIMARIES, **kwargs)
        if isinstance(replies, dict):
            return [key for part in replies.values() for key in part]
        return [k if isinstance(k, bytes) else k.encode() for k in replies]

"""Test harness for Kōrero and the services built on it.

`PrivateRedis` starts a `redis-server` of its own on a free loopback port,
which a test or a benchmark may stop, pause (SIGSTOP) and restart;
`PrivateRedisCluster` a Redis Cluster of such servers (with replicas, for
failover); `LocalPKI` a throwaway CA with server and client certificates;
`ServeProcess` a `korero serve` child process whose log lines it watches; the
simulated upstream is `korero.sim.UpstreamSim`. The project's tests and
benchmarks use these, so there is one way to start each part.
"""

from __future__ import annotations

from korero.testing._pki import CertPair, LocalPKI
from korero.testing._redis import REDIS_SERVER, PrivateRedis, free_port
from korero.testing._redis_cluster import PrivateRedisCluster
from korero.testing._serve import ServeProcess

__all__ = [
    "REDIS_SERVER",
    "CertPair",
    "LocalPKI",
    "PrivateRedis",
    "PrivateRedisCluster",
    "ServeProcess",
    "free_port",
]

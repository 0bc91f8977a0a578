"""Test harness for Kōrero and the services built on it.

`PrivateRedis` starts a `redis-server` of its own on a free loopback port,
which a test or a benchmark may stop, pause (SIGSTOP) and restart;
`PrivateRedisCluster` a Redis Cluster of such servers (with replicas, for
failover); the simulated upstream is `korero.sim.UpstreamSim`.
`PrivatePostgres` is a PostgreSQL cluster of its own (initdb + pg_ctl as the
`postgres` user) that a test may kill -9 and restart; `fresh_database` makes
a migrated database on the machine's server. `FlakyProxy` is a loopback TCP
proxy that spreads connections over several servers and cuts them at random
times. `LocalPKI` is a throwaway CA with server and client certificates;
`ServeProcess` a `korero serve` child process whose log lines it watches. The project's tests and
benchmarks use these, so there is one way to start each part.
"""

from __future__ import annotations

from korero.testing._pki import CertPair, LocalPKI
from korero.testing._postgres import SHARED_URL, PrivatePostgres, drop_database, fresh_database
from korero.testing._proxy import FlakyProxy
from korero.testing._redis import REDIS_SERVER, PrivateRedis, free_port
from korero.testing._redis_cluster import PrivateRedisCluster
from korero.testing._serve import ServeProcess

__all__ = [
    "REDIS_SERVER",
    "SHARED_URL",
    "CertPair",
    "FlakyProxy",
    "LocalPKI",
    "PrivatePostgres",
    "PrivateRedis",
    "PrivateRedisCluster",
    "ServeProcess",
    "drop_database",
    "free_port",
    "fresh_database",
]

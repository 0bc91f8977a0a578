"""Test harness for Kōrero and the services built on it.

`PrivateRedis` starts a `redis-server` of its own on a free loopback port,
which a test or a benchmark may stop, pause (SIGSTOP) and restart; the
simulated upstream is `korero.sim.UpstreamSim`. The project's tests and
benchmarks use these, so there is one way to start each part.
"""

from __future__ import annotations

from korero.testing._redis import REDIS_SERVER, PrivateRedis, free_port

__all__ = ["REDIS_SERVER", "PrivateRedis", "free_port"]

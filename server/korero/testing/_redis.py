"""A private redis-server on a free loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

__all__ = ["REDIS_SERVER", "PrivateRedis", "free_port", "spawn_redis", "wait_ping"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

_START_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_redis(port: int, workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    """`redis-server` on 127.0.0.1:`port` without persistence, files in `workdir`."""
    return subprocess.Popen(  # noqa: S603 - our own argv, no shell
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ping(
    port: int, timeout: float = _START_TIMEOUT, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until the server on `port` answers PING (raises after `timeout` or if `proc` exits)."""
    client = redis.Redis(port=port)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                exited = proc is not None and proc.poll() is not None
                if exited or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    finally:
        client.close()


class PrivateRedis:
    """A redis-server without persistence that its owner may kill, pause and restart.

    `args` are extra `redis-server` options, e.g. `("--maxmemory", "1mb")`.
    The port stays the same across restarts.
    """

    def __init__(self, workdir: Path, *, args: Sequence[str] = (), port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.args = tuple(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) and wait until it answers PING."""
        self.proc = spawn_redis(self.port, self.workdir, *self.args)
        wait_ping(self.port, _START_TIMEOUT, self.proc)

    def stop(self) -> None:
        """Kill it (SIGKILL: nothing is saved)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A synchronous client for checks."""
        return redis.Redis(port=self.port)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""PostgreSQL for tests and benchmarks: a fresh database, or a private cluster.

Most suites use a database of their own on the machine's server at
127.0.0.1:5432 (`fresh_database`). Tests that stop or kill PostgreSQL start a
private cluster (`PrivatePostgres`): `initdb` refuses to run as root, so it and
`pg_ctl` run as the `postgres` user on a directory that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from korero.server.storage.migrate import ensure_database, migrate

__all__ = ["SHARED_URL", "PrivatePostgres", "drop_database", "fresh_database"]

SHARED_URL = os.environ.get("KORERO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (Debian package postgresql)")
    return found[-1]


def _as_postgres(args: list[str]) -> list[str]:
    return args if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *args]


async def fresh_database(base_url: str = SHARED_URL) -> str:
    """A new, migrated database on the server at `base_url`; returns its URL."""
    url = f"{base_url}/korero_test_{uuid.uuid4().hex[:12]}"
    await ensure_database(url)
    await migrate(url)
    return url


async def drop_database(url: str) -> None:
    base, _, name = url.rpartition("/")
    conn = await asyncpg.connect(f"{base}/postgres", timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # our own name
    finally:
        await conn.close()


class PrivatePostgres:
    """A private PostgreSQL cluster on a free port that a test may kill and restart."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="korero-pg-"))
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(  # noqa: S603 - our own argv, no shell
            _as_postgres([_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def base_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (after a kill -9, orphaned backends may hold shared memory a moment: retry)."""
        for attempt in range(20):
            try:
                self._start()
                return
            except subprocess.CalledProcessError:
                if attempt == 19:
                    raise
                time.sleep(0.25)

    def _start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c full_page_writes=off"  # test cluster: WAL survives a kill -9
        )
        subprocess.run(  # noqa: S603 - our own argv, no shell
            _as_postgres(
                [
                    _bin("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    options,
                    "-l",
                    str(self.dir / "log"),
                    "-w",
                    "-t",
                    "30",
                    "start",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def kill9(self) -> None:
        """kill -9 of the postmaster (its backends notice and exit)."""
        pid = self.postmaster_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)

    def stop(self) -> None:
        subprocess.run(  # noqa: S603 - our own argv, no shell
            _as_postgres([_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

"""PostgreSQL in tests: the harness lives in `korero.testing` (next to `PrivateRedis`)."""

from __future__ import annotations

import asyncio
import time

from korero.testing import PrivatePostgres, drop_database, fresh_database

PostgresProcess = PrivatePostgres

__all__ = ["PostgresProcess", "drop_database", "fresh_database", "wait_until"]


async def wait_until(predicate: object, timeout: float, interval: float = 0.05) -> None:
    """Poll an async predicate until it is true (AssertionError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)

"""`korero serve` as a child process, with its log lines watched as they arrive."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

__all__ = ["ServeProcess"]

KORERO = str(Path(sys.executable).parent / "korero")


class ServeProcess:
    """A running `korero serve` whose stderr is read into `lines` in the background."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, env: dict[str, str]) -> ServeProcess:
        proc = await asyncio.create_subprocess_exec(
            KORERO,
            "serve",
            *args,
            env={**os.environ, **env},
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            async with self._changed:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(
        self,
        pattern: str,
        *,
        count: int = 1,
        timeout: float = 30,  # noqa: ASYNC109 - a bound per wait, as UpstreamSim.wait_for
    ) -> list[re.Match[str]]:
        """The first `count` log lines matching `pattern` (waiting for them to appear)."""
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout), self._changed:
            while True:
                found = [m for line in self.lines if (m := regex.search(line))]
                if len(found) >= count:
                    return found[:count]
                if self._reader.done():
                    tail = "\n".join(self.lines[-20:])
                    raise AssertionError(f"server exited before {pattern!r}:\n{tail}")
                await self._changed.wait()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        """Kill it (and its workers) if still running."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

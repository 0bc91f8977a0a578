"""A loopback TCP proxy that spreads connections over backends and cuts them at random."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence

__all__ = ["FlakyProxy"]

_CHUNK = 65536


class FlakyProxy:
    """Each accepted connection goes to a backend chosen at random and, with `lifetime`
    set, is cut (both sides reset) after a random time in that range — mid-answer,
    between turns or during a replay, whatever the client was doing then.

        async with FlakyProxy([("127.0.0.1", a), ("127.0.0.1", b)], lifetime=(0.1, 0.8)) as p:
            ...  # clients dial 127.0.0.1:p.port
    """

    def __init__(
        self,
        backends: Sequence[tuple[str, int]],
        *,
        lifetime: tuple[float, float] | None = None,
        seed: int = 0,
    ) -> None:
        self.backends = list(backends)
        self.lifetime = lifetime
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.connections = 0
        self.cuts = 0
        self.per_backend = [0] * len(self.backends)

    @property
    def open_connections(self) -> int:
        """Client connections accepted and not yet closed (by either side)."""
        return len(self._tasks)

    async def __aenter__(self) -> FlakyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = self._rng.randrange(len(self.backends))
        self.connections += 1
        self.per_backend[index] += 1
        try:
            host, port = self.backends[index]
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                writer.transport.abort()
                return
            pipes = [
                asyncio.create_task(_pipe(reader, up_writer)),
                asyncio.create_task(_pipe(up_reader, writer)),
            ]
            life = self._rng.uniform(*self.lifetime) if self.lifetime else None
            try:
                _, pending = await asyncio.wait(
                    pipes, timeout=life, return_when=asyncio.FIRST_COMPLETED
                )
            except asyncio.CancelledError:  # the proxy is closing
                pending = set()
            if pending and life is not None:
                self.cuts += 1
            for pipe in pipes:
                pipe.cancel()
            writer.transport.abort()
            up_writer.transport.abort()
        finally:
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()

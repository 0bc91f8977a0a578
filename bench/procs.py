"""Processes a benchmark starts and watches: private Redis, the simulated
upstream, Kōrero servers, the echo server; RSS and CPU from /proc.

Everything binds 127.0.0.1 on a free port; everything started here is killed
by `ProcessGroup.close()` (also on errors: use it as a context manager).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from korero.testing import PrivateRedis, free_port

__all__ = ["ProcSampler", "ProcessGroup", "free_port", "loadavg", "proc_cpu", "proc_rss"]

ROOT = Path(__file__).resolve().parent.parent


def proc_rss(pid: int) -> int:
    """Resident set size in bytes (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def loadavg() -> float:
    """The 1-minute load average (what every benchmark table records)."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = ""
            log = getattr(proc, "log_path", None)
            if log is not None and Path(log).exists():
                tail = "\n" + "\n".join(Path(log).read_text(errors="replace").splitlines()[-5:])
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g}s")


@dataclass
class ProcSampler:
    """Samples RSS and CPU of some processes in a thread while a run goes on."""

    pids: list[int]
    interval: float = 0.25
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    t_start: float = 0.0
    t_end: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def rss(self) -> int:
        return sum(proc_rss(p) for p in self.pids)

    def cpu(self) -> float:
        return sum(proc_cpu(p) for p in self.pids)

    def __enter__(self) -> Self:
        self.rss_start = self.rss_peak = self.rss()
        self.cpu_start = self.cpu()
        self.t_start = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.rss_peak = max(self.rss_peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.rss_end = self.rss()
        self.rss_peak = max(self.rss_peak, self.rss_end)
        self.cpu_end = self.cpu()
        self.t_end = time.monotonic()

    def summary(self) -> dict[str, Any]:
        wall = max(1e-9, self.t_end - self.t_start)
        cpu = self.cpu_end - self.cpu_start
        return {
            "pids": self.pids,
            "rssBytesStart": self.rss_start,
            "rssBytesPeak": self.rss_peak,
            "rssBytesEnd": self.rss_end,
            "cpuSeconds": cpu,
            "cpuUtilization": cpu / wall,
        }


class ProcessGroup:
    """Starts helper processes and kills every one of them on close."""

    def __init__(self, workdir: Path | None = None, *, verbose: bool = False) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="korero-bench-") if workdir is None else None
        self.workdir = Path(self._tmp.name) if self._tmp else workdir  # type: ignore[assignment]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.verbose = verbose

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _spawn(
        self, args: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_path = self.workdir / f"proc-{len(self.procs)}.log"
        log = open(log_path, "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        log.close()
        proc.log_path = log_path  # type: ignore[attr-defined]  # for start-up failures
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout=3.0)
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- components ------------------------------------------------------------

    def redis(self) -> tuple[str, int, subprocess.Popen[bytes]]:
        private = PrivateRedis(self.workdir, args=("--maxclients", "10000"))
        private.start()
        assert private.proc is not None
        self.procs.append(private.proc)
        return private.url, private.port, private.proc

    def sim(
        self, *, ttft_ms: float = 0.0, tokens_per_second: float = 0.0, answer_tokens: int = 40
    ) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        proc = self._spawn(
            [
                sys.executable,
                "-m",
                "korero.sim",
                "--port",
                str(port),
                "--ttft-ms",
                str(ttft_ms),
                "--tokens-per-second",
                str(tokens_per_second),
                "--answer-tokens",
                str(answer_tokens),
                "--persona",
                "echo",
            ],
            env={"PYTHONUNBUFFERED": "1"},
        )
        _wait_port(port, proc, 20, "the simulated upstream")
        return f"http://127.0.0.1:{port}/v1", proc

    def servers(
        self,
        count: int,
        *,
        redis_url: str,
        llm_url: str,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        python: str | None = None,
    ) -> tuple[int, list[subprocess.Popen[bytes]]]:
        """`count` `korero serve` processes sharing one port (SO_REUSEPORT).

        `python`: another interpreter (e.g. a baseline checkout's venv) to run them with.
        """
        port = port or free_port()
        base = {
            "KORERO_LISTEN": f"127.0.0.1:{port}",
            "REDIS_URL": redis_url,
            "KORERO_LLM_BASE_URL": llm_url,
            "KORERO_LLM_API_KEY": "bench",
            "KORERO_LOG_LEVEL": "WARNING",
            "KORERO_WORKERS": "1",  # one process each: these scenarios count processes themselves
            "KORERO_REDIS_MAX_CONNECTIONS": "256",
            # On, as in production, but on free ports: a shared machine may hold the defaults.
            "KORERO_WS_LISTEN": "127.0.0.1:0",
            "KORERO_METRICS_LISTEN": "127.0.0.1:0",
            # The limiter stays on (its Redis round trip is part of every measured turn), with
            # budgets no scenario reaches: the defaults (600 requests/min per tenant, all load
            # is one tenant) would throttle every load scenario to 10 turns/s.
            "KORERO_SESSION_MESSAGES_PER_MINUTE": "1000000",
            "KORERO_TENANT_REQUESTS_PER_MINUTE": "1000000000",
            "KORERO_TENANT_TOKENS_PER_MINUTE": "1000000000000",
            **(env or {}),
        }
        procs = [
            self._spawn([python or sys.executable, "-m", "korero.client.cli", "serve"], env=base)
            for _ in range(count)
        ]
        for proc in procs:
            _wait_port(port, proc, 20, "korero serve")
        time.sleep(0.3 * count)  # every process has bound before the kernel spreads connections
        return port, procs

    def echo_server(self) -> tuple[int, subprocess.Popen[bytes]]:
        port = free_port()
        proc = self._spawn([sys.executable, "-m", "bench.echo_server", "--port", str(port)])
        _wait_port(port, proc, 20, "the echo server")
        return port, proc


def pids_of(procs: Iterable[subprocess.Popen[bytes]]) -> list[int]:
    return [p.pid for p in procs]

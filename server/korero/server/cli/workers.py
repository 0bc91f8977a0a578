"""`korero serve --workers N`: N server processes sharing one set of ports.

grpcio's asyncio server runs on one core, so one machine's cores are used
the way grpc's own multiprocessing example does it: several processes bind
the same gRPC, WebSocket and metrics ports with `SO_REUSEPORT` and the
kernel spreads new connections between them (per connection, not per call:
a client must open several connections to use several workers; behind
Envoy, its upstream connection pool does).

The parent process serves nothing. It

- reserves a port for every listener configured with port 0 (a bound,
  non-listening `SO_REUSEPORT` socket it holds until it exits), so all
  workers share one port and tests can still ask for a free one;
- creates the prometheus-client multiprocess directory, so each worker's
  `/metrics` (and ops snapshot) reports the sum over all workers;
- starts the workers (`spawn`, so no grpcio or event-loop state is
  inherited) and waits until each says it is serving;
- restarts a worker that dies, logging `event=worker_exited`, with a
  backoff that grows while it keeps crashing;
- on SIGTERM or SIGINT sends SIGTERM to every worker — each drains exactly
  like a single server (NOT_SERVING, turns finish within the grace, streams
  end with UNAVAILABLE) — and kills those still running after the grace
  plus a margin. Should the supervisor itself be killed outright, the kernel
  kills its workers too (`PR_SET_PDEATHSIG`): `kill -9` of `korero serve`
  ends the instance at once, as it would a single process, and the turns it
  was running are freed by their lease (KORERO_TURN_LEASE).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from korero.server.settings import ServerSettings, Settings

__all__ = ["STARTUP_FAILED", "Supervisor", "available_cores", "configure_logging"]

log = logging.getLogger(__name__)

STARTUP_FAILED = 3
"""Exit code of a worker that could not start serving (bad address, port taken)."""

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_READY_TIMEOUT = 60.0
_STOP_MARGIN = 10.0
"""Seconds past the shutdown grace before a worker that still runs is killed."""
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_CRASH_WINDOW = 60.0
"""A worker alive this long is healthy again: its restart backoff starts over."""


def available_cores() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cores)


def configure_logging(level: str, worker: int | None = None) -> None:
    """key=value lines on stderr; a worker's lines carry `worker=N`."""
    tag = "" if worker is None else f" worker={worker}"
    logging.basicConfig(
        level=level.upper(),
        format=f"ts=%(asctime)s level=%(levelname)s{tag} logger=%(name)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # One line per upstream HTTP request is noise next to our own turn events.
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _worker_main(settings: Settings, index: int, metrics_dir: str, ready: Any, parent: int) -> None:
    """The body of one worker process (runs in a fresh interpreter)."""
    import asyncio  # noqa: PLC0415 - the worker imports the server, the parent never does

    import uvloop  # noqa: PLC0415

    from korero.server.app import run  # noqa: PLC0415

    configure_logging(settings.server.log_level, index)
    _follow_parent_down(parent)
    # A stop request that arrives while the worker is still starting is kept
    # and acted on once the server has installed its own (draining) handlers:
    # leaving from inside a signal handler mid-start (SystemExit while grpcio
    # initialises) crashed the process. Ctrl-C reaches the parent too, which
    # turns it into SIGTERM.
    stop_requested: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stop_requested.append(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def serving() -> None:
        ready.set()
        if stop_requested:  # now the server's handler drains (and finds nothing to drain)
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(settings, multiprocess_dir=Path(metrics_dir), on_serving=serving))
    except OSError as exc:
        print(f"korero serve: worker {index}: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILED if not ready.is_set() else 1)


def _follow_parent_down(parent: int) -> None:
    """Have the kernel kill this worker if the supervisor dies: a worker must not
    keep serving, unsupervised, after `kill -9` of its parent."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    ready: Any
    started: float
    crashes: int = 0
    """Consecutive crashes (reset once the worker has lived `_CRASH_WINDOW`)."""
    restart_at: float | None = None


@dataclass
class Supervisor:
    """Runs `count` workers of one server configuration until told to stop."""

    settings: Settings
    count: int
    _reserved: list[socket.socket] = field(default_factory=list)
    _workers: list[_Worker] = field(default_factory=list)
    _stopping: bool = False
    _metrics_dir: Path | None = None

    def run(self) -> int:
        """Start, supervise and drain the workers; the process exit code."""
        context = multiprocessing.get_context("spawn")
        try:
            self.settings = dataclasses.replace(
                self.settings, server=self._reserve_ports(self.settings.server)
            )
            self.settings = dataclasses.replace(
                self.settings,
                observability=dataclasses.replace(
                    self.settings.observability,
                    metrics_listen=self._reserve(self.settings.observability.metrics_listen),
                ),
            )
        except OSError as exc:
            print(f"korero serve: cannot listen: {exc}", file=sys.stderr)
            return 1
        self._metrics_dir = Path(tempfile.mkdtemp(prefix="korero-metrics-"))
        # prometheus-client picks its multiprocess value class when it is
        # imported, from this variable: the spawned workers inherit it.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self._metrics_dir)
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        try:
            return self._supervise(context, wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            for sock in self._reserved:
                sock.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        self._stopping = True

    def _supervise(self, context: Any, wake: socket.socket) -> int:
        server = self.settings.server
        log.info(
            "event=supervising workers=%d address=%s ws=%s metrics=%s pid=%d",
            self.count,
            server.listen,
            server.ws_listen or "off",
            self.settings.observability.metrics_listen or "off",
            os.getpid(),
        )
        self._workers = [self._start(context, i) for i in range(self.count)]
        if not self._await_ready(wake):
            code = self._stop_all()
            return code if self._stopping else 1  # told to stop while starting: not a failure
        log.info("event=workers_serving workers=%d", self.count)
        while not self._stopping:
            now = time.monotonic()
            timeouts = [w.restart_at - now for w in self._workers if w.restart_at is not None]
            waitables: list[Any] = [wake]
            waitables += [w.process.sentinel for w in self._workers if w.restart_at is None]
            wait(waitables, timeout=max(0.0, min(timeouts, default=5.0)))
            _drain(wake)
            if self._stopping:
                break
            for i, worker in enumerate(self._workers):
                if worker.restart_at is None and not worker.process.is_alive():
                    self._schedule_restart(worker)
                elif worker.restart_at is not None and worker.restart_at <= time.monotonic():
                    self._workers[i] = self._start(context, worker.index, worker.crashes)
        return self._stop_all()

    def _start(self, context: Any, index: int, crashes: int = 0) -> _Worker:
        ready = context.Event()
        process = context.Process(
            target=_worker_main,
            args=(self.settings, index, str(self._metrics_dir), ready, os.getpid()),
            name=f"korero-worker-{index}",
        )
        process.start()
        log.info("event=worker_started worker=%d pid=%s restarts=%d", index, process.pid, crashes)
        return _Worker(index, process, ready, time.monotonic(), crashes)

    def _await_ready(self, wake: socket.socket) -> bool:
        deadline = time.monotonic() + _READY_TIMEOUT
        while not all(w.ready.is_set() for w in self._workers):
            failed = [w for w in self._workers if not w.process.is_alive()]
            if failed or self._stopping or time.monotonic() > deadline:
                for w in failed:
                    log.error(
                        "event=worker_failed_to_start worker=%d pid=%s exitcode=%s",
                        w.index,
                        w.process.pid,
                        w.process.exitcode,
                    )
                return False
            wait([wake] + [w.process.sentinel for w in self._workers], timeout=0.05)
            _drain(wake)
        return True

    def _schedule_restart(self, worker: _Worker) -> None:
        """Log a dead worker and plan its restart (sooner when it had lived a while)."""
        from prometheus_client import multiprocess  # noqa: PLC0415

        pid = worker.process.pid
        lived = time.monotonic() - worker.started
        crashes = 1 if lived > _CRASH_WINDOW else worker.crashes + 1
        delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (crashes - 1))
        log.error(
            "event=worker_exited worker=%d pid=%s exitcode=%s lived=%.1f restart_in=%.1f",
            worker.index,
            pid,
            worker.process.exitcode,
            lived,
            delay,
        )
        if pid is not None:  # its live gauges (open streams) no longer count
            multiprocess.mark_process_dead(pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
        worker.process.close()
        worker.crashes = crashes
        worker.restart_at = time.monotonic() + delay

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait for the drain, kill stragglers; 0 if all exited 0."""
        running = [w for w in self._workers if w.restart_at is None and w.process.is_alive()]
        log.info(
            "event=draining_workers workers=%d grace=%.1f",
            len(running),
            self.settings.server.shutdown_grace,
        )
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid or 0, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.server.shutdown_grace + _STOP_MARGIN
        for worker in running:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("event=worker_killed worker=%d pid=%s", worker.index, worker.process.pid)
                worker.process.kill()
                worker.process.join()
        codes = [w.process.exitcode for w in running]
        log.info("event=workers_stopped exitcodes=%s", ",".join(str(c) for c in codes))
        # A worker stopped while still starting had nothing to drain.
        clean = [
            code == 0 or (code == -signal.SIGTERM and not w.ready.is_set())
            for w, code in zip(running, codes, strict=True)
        ]
        return 0 if all(clean) else 1

    def _reserve_ports(self, server: ServerSettings) -> ServerSettings:
        return dataclasses.replace(
            server,
            listen=self._reserve(server.listen) or server.listen,
            ws_listen=self._reserve(server.ws_listen),
        )

    def _reserve(self, listen: str | None) -> str | None:
        """`listen` with port 0 replaced by a port held for the workers to share."""
        if listen is None:
            return None
        host, _, port = listen.rpartition(":")
        if port != "0":
            return listen
        bare = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((bare, 0))
        self._reserved.append(sock)
        return f"{host}:{sock.getsockname()[1]}"


def _drain(wake: socket.socket) -> None:
    wake.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while wake.recv(64):
            pass

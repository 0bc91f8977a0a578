"""The load generator: ghz's call model, run by several client processes.

The parent process splits the concurrency and the connections over
``processes`` workers (spawned, so no gRPC state crosses a fork). Each worker
runs one uvloop event loop with its own channels and concurrent call loops;
request numbers come from one shared counter, so ``total`` and
``{{.RequestNumber}}`` mean what they mean in ghz. Workers send their results
back once, at the end; progress travels through shared counters.

What one "call" is, per method kind:

* unary (``grpc.health.v1.Health/Check``): one request, one response;
* server streaming (``SendMessage``): one request, read to the end;
* bidi (``Chat``): the whole ``data`` array on one stream — ``start`` first,
  then each message, **waiting for the turn's terminal event** before the next
  message (and ``stream-interval`` after it). ghz itself sends on the interval
  without waiting; a chat client waits, and a message sent mid-turn would only
  be rejected with ``TURN_IN_FLIGHT``.

Besides the ghz per-call details, every streamed turn records the time to its
first text delta, the gaps between deltas, its latency, and its text bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import os
import random
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from bench.config import CallSpec, GhzConfig, Template, template_fields

__all__ = ["LABELS", "RunResult", "Workload", "raise_fd_limit", "run"]

LABELS = ("korero", "direct", "echo")
# ghz keeps at most this many per-call details (runner/reporter.go maxResult).
MAX_DETAILS = 1_000_000
# Per process, the most latency samples of each kind kept for percentiles.
MAX_SAMPLES = 400_000
# Hard upper bound on any run without its own duration: every run ends.
DEFAULT_MAX_RUN = 600.0

GO_CODE_NAMES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}


@dataclass(frozen=True)
class Workload:
    """A ghz config plus how this tool runs it."""

    config: GhzConfig
    processes: int = 2
    hold: float = 0.0
    """Chat: after its data, hold each stream open until all are open (at most this long)."""
    active_every: int = 1
    """Chat: only every n-th stream sends messages; the others just start and hold."""
    direct_base_url: str = ""
    """Interleave: after each Kōrero turn, the same question straight to this upstream."""
    direct_system_prompt: str = ""
    """System prompt of direct turns; empty: Kōrero's default, so both paths send alike."""
    direct_model: str = "korero-sim-1"
    echo: bool = False
    """Chat against bench/echo_server.py: pipeline `echo_messages` messages per stream."""
    echo_messages: int = 100
    progress: bool = True
    grpc_options: tuple[tuple[str, Any], ...] = ()
    open_retries: int = 0
    """Chat: a stream whose open is refused with a `RetryInfo` delay (the server pacing a
    burst: `SESSION_OPENS_BUSY`) is opened again after that delay, at most this many times.
    The call counts once (its final status); the retries are counted apart."""


@dataclass
class _Samples:
    """Streaming figures of one path (Kōrero, direct upstream, echo) in one process."""

    ttfd: list[int] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)
    turns_ns: list[int] = field(default_factory=list)
    turns: int = 0
    deltas: int = 0
    text_bytes: int = 0
    turn_errors: Counter[str] = field(default_factory=Counter)

    def add(self, samples: list[int], value: int) -> None:
        if len(samples) < MAX_SAMPLES:
            samples.append(value)

    def merge(self, other: _Samples) -> None:
        self.ttfd += other.ttfd
        self.gaps += other.gaps
        self.turns_ns += other.turns_ns
        self.turns += other.turns
        self.deltas += other.deltas
        self.text_bytes += other.text_bytes
        self.turn_errors.update(other.turn_errors)


@dataclass
class RunResult:
    """Everything the workers measured, merged."""

    workload: Workload
    end_reason: str
    started_ns: int
    wall: float
    details: list[tuple[int, int, str, str]]
    count: int
    status_codes: Counter[str]
    errors: Counter[str]
    latency_sum_ns: int
    streams: dict[str, _Samples]
    client_cpu: float
    client_process_utilization: list[float]
    open_peak: int
    stream_wall: float = 0.0
    """Seconds from the first to the last streamed text delta (throughput denominator)."""
    hold_samples: dict[str, Any] = field(default_factory=dict)
    open_retries: int = 0
    """Chat opens sent again after a refusal with RetryInfo (`Workload.open_retries`)."""
    open_retried_calls: int = 0
    """Calls that needed at least one such retry."""
    open_retry_reasons: Counter[str] = field(default_factory=Counter)
    """Refusals retried, by `CODE REASON`."""

    @property
    def client_bound(self) -> bool:
        cores = len(os.sched_getaffinity(0))
        util = self.client_process_utilization
        return bool(util) and (max(util) >= 0.9 or sum(util) >= 0.9 * cores)


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- the worker process ---------------------------------------------------------------


class _Shared:
    """Counters shared by all processes of one run."""

    def __init__(self, ctx: Any, processes: int) -> None:
        self.next_request: Synchronized[int] = ctx.Value("q", 0)
        self.done = ctx.Array("q", processes, lock=False)
        self.failed = ctx.Array("q", processes, lock=False)
        self.open = ctx.Array("q", processes, lock=False)
        self.stop = ctx.Event()
        self.release = ctx.Event()


def _go_error(code_name: str, details: str) -> str:
    return f"rpc error: code = {GO_CODE_NAMES.get(code_name, code_name)} desc = {details}"


class _Worker:
    def __init__(self, workload: Workload, index: int, shared: _Shared) -> None:
        import grpc  # noqa: PLC0415 - imported in the spawned worker only

        self.grpc = grpc
        self.workload = workload
        self.cfg = workload.config
        self.spec: CallSpec = self.cfg.spec
        self.index = index
        self.shared = shared
        self.templates: list[Template] = self.cfg.data_templates()
        self.metadata_template = Template.of(self.cfg.metadata)
        self.rng = random.Random()
        self.details: list[tuple[int, int, str, str]] = []
        self.count = 0
        self.latency_sum = 0
        self.status_codes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.streams = {label: _Samples() for label in LABELS}
        self.first_delta_ns = 0
        self.last_delta_ns = 0
        self.open_now = 0
        self.open_retries = 0
        self.open_retried_calls = 0
        self.open_retry_reasons: Counter[str] = Counter()
        self.inflight: set[asyncio.Task[Any]] = set()
        self.released: asyncio.Event | None = None
        self.release_watch: asyncio.Task[None] | None = None
        self.direct: Any = None
        self.pb: Any = None
        self.recording = True

    # -- set-up ------------------------------------------------------------------

    def _channels(self, count: int) -> list[Any]:
        options = [
            # Without a local subchannel pool, channels to one target share one TCP connection.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            *self.workload.grpc_options,
        ]
        return [
            self.grpc.aio.insecure_channel(self.cfg.host, options=[*options, ("bench.ch", i)])
            for i in range(count)
        ]

    def _stub_call(self, channel: Any) -> Callable[..., Any]:
        from korero.chat.v1 import chat_pb2 as pb  # noqa: PLC0415

        self.pb = pb
        if self.spec.full_name == "grpc.health.v1.Health.Check":
            from grpc_health.v1 import health_pb2  # noqa: PLC0415

            self.request_type = health_pb2.HealthCheckRequest
            return channel.unary_unary(  # type: ignore[no-any-return]
                self.spec.path,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
        if self.spec.kind == "server_stream":
            self.request_type = pb.SendMessageRequest
            return channel.unary_stream(  # type: ignore[no-any-return]
                self.spec.path,
                request_serializer=pb.SendMessageRequest.SerializeToString,
                response_deserializer=pb.SendMessageResponse.FromString,
            )
        self.request_type = pb.ChatRequest
        return channel.stream_stream(  # type: ignore[no-any-return]
            self.spec.path,
            request_serializer=pb.ChatRequest.SerializeToString,
            response_deserializer=pb.ChatResponse.FromString,
        )

    # -- the run -------------------------------------------------------------------

    async def run(self, concurrency: int, connections: int, deadline: float) -> None:
        from google.protobuf import json_format  # noqa: PLC0415

        self.json_format = json_format
        if self.workload.direct_base_url:
            import openai  # noqa: PLC0415

            from korero.server.settings import EngineSettings  # noqa: PLC0415

            self.system_prompt = self.workload.direct_system_prompt or (
                EngineSettings().system_prompt
            )
            self.direct = openai.AsyncOpenAI(
                base_url=self.workload.direct_base_url,
                api_key="bench",
                max_retries=0,
                timeout=openai.Timeout(connect=5.0, read=None, write=10.0, pool=60.0),
            )
        channels = self._channels(connections)
        calls = [self._stub_call(ch) for ch in channels]
        rps = self.cfg.rps / self.workload.processes if self.cfg.rps else 0.0
        pacer = _Pacer(rps)
        loops = [
            asyncio.create_task(
                self._loop(
                    f"p{self.index}g{i}c{i % connections}", calls[i % connections], pacer, deadline
                )
            )
            for i in range(concurrency)
        ]
        try:
            await asyncio.gather(*loops)
            pending = {t for t in self.inflight if not t.done()}
            if pending and self.cfg.duration_stop == "wait":
                await asyncio.wait(pending, timeout=self.cfg.timeout or 60.0)
            elif self.cfg.duration_stop == "ignore":
                self.recording = False
        finally:
            watch = [self.release_watch] if self.release_watch is not None else []
            for task in [*loops, *self.inflight, *watch]:
                task.cancel()
            await asyncio.gather(*loops, *self.inflight, *watch, return_exceptions=True)
            for ch in channels:
                await ch.close(grace=None)
            if self.direct is not None:
                await self.direct.close()

    async def _loop(self, worker_id: str, call: Any, pacer: _Pacer, deadline: float) -> None:
        total = self.cfg.total if not self.cfg.duration else 0
        counter = self.shared.next_request
        loop = asyncio.get_running_loop()
        while not self.shared.stop.is_set() and loop.time() < deadline:
            with counter.get_lock():
                number = counter.value
                counter.value += 1
            if total and number >= total:
                return
            await pacer.wait()
            task = asyncio.create_task(self._one(worker_id, number, call))
            self.inflight.add(task)
            try:
                await asyncio.wait_for(
                    asyncio.shield(task), timeout=max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                return  # the parent decides what happens to calls in flight at the deadline
            finally:
                if task.done():
                    self.inflight.discard(task)

    async def _one(self, worker_id: str, number: int, call: Any) -> None:
        fields = template_fields(self.spec, worker_id, number)
        messages = [t.render(fields, self.rng) for t in self.templates]
        metadata = tuple(self.metadata_template.render(fields, self.rng).items())
        started_ns = time.time_ns()
        t0 = time.perf_counter_ns()
        status, error = "OK", ""
        try:
            if self.spec.kind == "unary":
                await call(
                    self._parse(messages[0]), metadata=metadata, timeout=self.cfg.timeout or None
                )
            elif self.spec.kind == "server_stream":
                await self._server_stream(call, messages[0], metadata)
            elif self.workload.echo:
                await self._echo(call, metadata)
            else:
                await self._chat(call, messages, metadata, number, fields)
        except self.grpc.aio.AioRpcError as exc:
            status = GO_CODE_NAMES.get(exc.code().name, exc.code().name)
            error = _go_error(exc.code().name, exc.details() or "")
        except asyncio.CancelledError:
            status = "Canceled"
            error = _go_error("CANCELLED", "the run ended with the call in flight")
            self._record(started_ns, t0, status, error)
            raise
        except Exception as exc:  # a bug or a broken stream: still one result
            status = "Unknown"
            error = _go_error("UNKNOWN", f"{type(exc).__name__}: {exc}")
        self._record(started_ns, t0, status, error)

    def _record(self, started_ns: int, t0: int, status: str, error: str) -> None:
        if not self.recording:
            return
        latency = time.perf_counter_ns() - t0
        self.count += 1
        self.latency_sum += latency
        self.status_codes[status] += 1
        if error:
            self.errors[error] += 1
            self.shared.failed[self.index] += 1
        if len(self.details) < MAX_DETAILS:
            self.details.append((started_ns, latency, status, error))
        self.shared.done[self.index] += 1

    def _parse(self, message: Any) -> Any:
        return self.json_format.ParseDict(message, self.request_type())

    # -- per kind ------------------------------------------------------------------

    def _note_delta(self, samples: _Samples, text: str, now: int) -> None:
        samples.deltas += 1
        samples.text_bytes += len(text.encode())
        if samples is self.streams["korero"] or samples is self.streams["echo"]:
            self.first_delta_ns = self.first_delta_ns or now
            self.last_delta_ns = now

    async def _server_stream(self, call: Any, message: Any, metadata: Any) -> None:
        samples = self.streams["korero"]
        t0 = time.perf_counter_ns()
        last = 0
        stream = call(self._parse(message), metadata=metadata, timeout=self.cfg.timeout or None)
        async for response in stream:
            event = response.event
            kind = event.WhichOneof("kind")
            now = time.perf_counter_ns()
            if kind == "text_delta":
                samples.add(samples.gaps, now - last) if last else samples.add(
                    samples.ttfd, now - t0
                )
                last = now
                self._note_delta(samples, event.text_delta.text, now)
            elif kind in ("done", "error"):
                samples.turns += 1
                samples.add(samples.turns_ns, now - t0)
                if kind == "error":
                    samples.turn_errors[event.error.reason] += 1

    async def _chat(
        self, call: Any, messages: list[Any], metadata: Any, number: int, fields: dict[str, Any]
    ) -> None:
        stream = await self._open(call, self._parse(messages[0]), metadata)
        if stream is None:
            return
        self.open_now += 1
        self.shared.open[self.index] = self.open_now
        try:
            rest = self.templates[1:]
            history: list[dict[str, str]] = []
            active = self.workload.active_every <= 1 or number % self.workload.active_every == 0
            if rest and active:
                count = self.cfg.stream_call_count - 1 if self.cfg.stream_call_count else len(rest)
                for i, template in enumerate(itertools.islice(itertools.cycle(rest), count)):
                    # Rendered per send (ghz: stream-dynamic-messages), so a cycled message
                    # gets a new {{newUUID}} and is not a retry of the one before.
                    request = self._parse(
                        messages[i + 1] if i < len(rest) else template.render(fields, self.rng)
                    )
                    text = request.message.text
                    if self.direct is not None and i % 2 == 1:
                        await self._direct_turn(text, history)
                    await self._chat_turn(stream, request)
                    if self.direct is not None and i % 2 == 0:
                        await self._direct_turn(text, history)
                    if self.cfg.stream_interval:
                        await asyncio.sleep(self.cfg.stream_interval)
            if self.workload.hold:
                await self._hold()
        finally:
            self.open_now -= 1
            self.shared.open[self.index] = self.open_now
        await stream.done_writing()
        while await stream.read() is not self.grpc.aio.EOF:
            pass
        await stream.code()

    async def _open(self, call: Any, start: Any, metadata: Any) -> Any:
        """A Chat stream past its first event; None if the server ended it there.

        A refusal carrying `RetryInfo` is retried after that delay (up to
        `open_retries` times); any other failure raises, as before.
        """
        from korero.client import ChatError  # noqa: PLC0415 - the worker's import

        for attempt in itertools.count():
            stream = call(metadata=metadata, timeout=self.cfg.timeout or None)
            try:
                await stream.write(start)
                first = await stream.read()
                if first is self.grpc.aio.EOF:
                    await stream.code()
                    return None
                return stream
            except self.grpc.aio.AioRpcError as exc:
                error = ChatError.from_rpc_error(exc)
                if error.retry_after is None or attempt >= self.workload.open_retries:
                    raise
                self.open_retries += 1
                self.open_retried_calls += attempt == 0
                self.open_retry_reasons[f"{error.code.name} {error.reason}"] += 1
                await asyncio.sleep(error.retry_after)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _hold(self) -> None:
        if self.released is None:
            self.released = asyncio.Event()
            self.release_watch = asyncio.create_task(self._watch_release(self.released))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.released.wait(), self.workload.hold)

    async def _watch_release(self, released: asyncio.Event) -> None:
        """One poll per process of the parent's release (a multiprocessing.Event): one
        poll per held stream was 10 wake-ups a second each, which at 50,000 streams left
        a client process too busy to read the server's answers."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.workload.hold
        while not self.shared.release.is_set() and loop.time() < until:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        released.set()

    async def _chat_turn(self, stream: Any, request: Any) -> None:
        samples = self.streams["korero"]
        kind_of = request.WhichOneof("kind")
        t0 = time.perf_counter_ns()
        await stream.write(request)
        if kind_of != "message":
            return
        cmid = request.message.client_message_id
        last = 0
        while True:
            response = await stream.read()
            if response is self.grpc.aio.EOF:
                return
            event = response.event
            kind = event.WhichOneof("kind")
            now = time.perf_counter_ns()
            if kind == "text_delta":
                samples.add(samples.gaps, now - last) if last else samples.add(
                    samples.ttfd, now - t0
                )
                last = now
                self._note_delta(samples, event.text_delta.text, now)
            elif kind == "done" or (
                kind == "error" and event.error.client_message_id in ("", cmid)
            ):
                samples.turns += 1
                samples.add(samples.turns_ns, now - t0)
                if kind == "error":
                    samples.turn_errors[event.error.reason] += 1
                return

    async def _direct_turn(self, text: str, history: list[dict[str, str]]) -> None:
        """One turn straight to the upstream, with the prompt Kōrero would assemble."""
        samples = self.streams["direct"]
        history.append({"role": "user", "content": text})
        del history[: max(0, len(history) - 20)]  # KORERO_PROMPT_HISTORY_MESSAGES
        answer: list[str] = []
        t0 = time.perf_counter_ns()
        last = 0
        import httpx2  # noqa: PLC0415 - only the direct path needs it

        from korero.server.llm.provider import SSE_DONE, parse_sse_line  # noqa: PLC0415

        # The same client path the server uses for its upstream (the openai
        # client's generic `post`, SSE lines parsed by `parse_sse_line`), so
        # "added" is Kōrero's own cost, not a difference between SDK paths.
        body = {
            "model": self.workload.direct_model,
            "messages": [{"role": "system", "content": self.system_prompt}, *history],
            "max_tokens": 512,
            "temperature": 0.2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            response = await self.direct.post(
                "/chat/completions", cast_to=httpx2.Response, body=body, stream=True
            )
            try:
                async for line in response.aiter_lines():
                    chunk = parse_sse_line(line)
                    if chunk is SSE_DONE:
                        break
                    if chunk is None or not chunk.text:
                        continue
                    now = time.perf_counter_ns()
                    if last:
                        samples.add(samples.gaps, now - last)
                    else:
                        samples.add(samples.ttfd, now - t0)
                    last = now
                    samples.deltas += 1
                    samples.text_bytes += len(chunk.text.encode())
                    answer.append(chunk.text)
            finally:
                await response.aclose()
        except Exception as exc:
            samples.turn_errors[type(exc).__name__] += 1
        history.append({"role": "assistant", "content": "".join(answer)})
        samples.turns += 1
        samples.add(samples.turns_ns, time.perf_counter_ns() - t0)

    async def _echo(self, call: Any, metadata: Any) -> None:
        samples = self.streams["echo"]
        pb = self.pb
        n = self.workload.echo_messages
        stream = call(metadata=metadata, timeout=self.cfg.timeout or None)
        request = pb.ChatRequest(message=pb.UserMessage(client_message_id="e", text=" token"))

        async def write() -> None:
            for _ in range(n):
                await stream.write(request)
            await stream.done_writing()

        writer = asyncio.create_task(write())
        t0 = time.perf_counter_ns()
        last = 0
        try:
            while True:
                response = await stream.read()
                if response is self.grpc.aio.EOF:
                    break
                now = time.perf_counter_ns()
                if last:
                    samples.add(samples.gaps, now - last)
                else:
                    samples.add(samples.ttfd, now - t0)
                last = now
                self._note_delta(samples, response.event.text_delta.text, now)
        finally:
            writer.cancel()
        samples.turns += 1
        samples.add(samples.turns_ns, time.perf_counter_ns() - t0)
        await stream.code()

    def results(self, wall: float, cpu: float) -> dict[str, Any]:
        return {
            "details": self.details,
            "count": self.count,
            "latency_sum": self.latency_sum,
            "status_codes": self.status_codes,
            "errors": self.errors,
            "streams": self.streams,
            "wall": wall,
            "cpu": cpu,
            "first_delta_ns": self.first_delta_ns,
            "last_delta_ns": self.last_delta_ns,
            "open_retries": self.open_retries,
            "open_retried_calls": self.open_retried_calls,
            "open_retry_reasons": self.open_retry_reasons,
        }


class _Pacer:
    """Spaces call starts to a rate (ghz --rps), shared by a process's call loops."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_at = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.next_at = max(self.next_at + self.interval, now)
        if self.next_at > now:
            await asyncio.sleep(self.next_at - now)


def _worker_main(
    workload: Workload,
    index: int,
    concurrency: int,
    connections: int,
    run_for: float,
    shared: _Shared,
    out: Any,
) -> None:
    import uvloop  # noqa: PLC0415

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    raise_fd_limit()
    worker = _Worker(workload, index, shared)
    import google.protobuf.json_format  # noqa: F401, PLC0415 - warm imports before the clock starts
    import grpc_health.v1.health_pb2  # noqa: F401, PLC0415

    import korero.chat.v1.chat_pb2  # noqa: F401, PLC0415

    t0 = time.monotonic()
    cpu0 = time.process_time()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + run_for
        runner = asyncio.create_task(worker.run(concurrency, connections, deadline))
        while not runner.done():
            if shared.stop.is_set():
                runner.cancel()
                break
            await asyncio.wait({runner}, timeout=0.05)
        with contextlib.suppress(asyncio.CancelledError):
            await runner

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    out.send(worker.results(time.monotonic() - t0, time.process_time() - cpu0))
    out.close()


# -- the parent -------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def run(
    workload: Workload,
    *,
    on_progress: Callable[[float, int, int, int], None] | None = None,
    on_all_open: Callable[[int], dict[str, Any]] | None = None,
) -> RunResult:
    """Run `workload` to its end (total, duration or max-duration) and merge the results.

    `on_all_open` is called once when every Chat stream of a `hold` run is open
    (or the hold time ran out); what it returns lands in `RunResult.hold_samples`.
    """
    cfg = workload.config
    processes = max(1, min(workload.processes, cfg.concurrency))
    ctx = mp.get_context("spawn")
    shared = _Shared(ctx, processes)
    limit = cfg.max_duration or DEFAULT_MAX_RUN
    run_for = min(cfg.duration, limit) if cfg.duration else limit
    conc = _split(cfg.concurrency, processes)
    conns = [max(1, c) for c in _split(cfg.connections, processes)]
    conns = [min(c, k) for c, k in zip(conns, conc, strict=True)]
    procs, pipes = [], []
    raise_fd_limit()
    for i in range(processes):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker_main,
            args=(workload, i, conc[i], conns[i], run_for, shared, sender),
            name=f"bench-client-{i}",
        )
        proc.start()
        sender.close()
        procs.append(proc)
        pipes.append(receiver)
    started_ns = time.time_ns()
    t0 = time.monotonic()
    end_reason = "normal"
    results: list[dict[str, Any] | None] = [None] * processes
    cpu_seen = [0.0] * processes
    hold_samples: dict[str, Any] = {}
    open_peak = 0
    last_progress = t0
    hard_deadline = t0 + run_for + max(cfg.timeout, 5.0) + 30.0
    try:
        while any(r is None for r in results):
            lost = False
            for i, pipe in enumerate(pipes):
                if results[i] is None and pipe.poll(0.02):
                    try:
                        results[i] = pipe.recv()
                    except EOFError:  # the worker died; its calls are lost, say so below
                        lost = True
            if lost:
                print("bench: a client process died; stopping the run", file=sys.stderr)
                shared.stop.set()
                break
            now = time.monotonic()
            for i, proc in enumerate(procs):
                if proc.pid is not None and results[i] is None:
                    cpu_seen[i] = max(cpu_seen[i], _proc_cpu(proc.pid))
            open_now = sum(shared.open[:])
            open_peak = max(open_peak, open_now)
            if (
                workload.hold
                and not shared.release.is_set()
                and (open_now >= _expected_open(cfg) or now - t0 > workload.hold)
            ):
                if on_all_open is not None:
                    hold_samples = on_all_open(open_now)
                shared.release.set()
            if cfg.duration and now - t0 > run_for and end_reason == "normal":
                end_reason = "timeout"
            if now - last_progress >= 1.0:
                last_progress = now
                done, failed = sum(shared.done[:]), sum(shared.failed[:])
                if on_progress is not None:
                    on_progress(now - t0, done, failed, open_now)
                elif workload.progress:
                    print(
                        f"  [{now - t0:6.1f}s] calls {done}  errors {failed}  "
                        f"open streams {open_now}  {done / (now - t0):.1f}/s",
                        file=sys.stderr,
                        flush=True,
                    )
            if now > hard_deadline:
                end_reason = "timeout"
                shared.stop.set()
                break
            if any(
                not p.is_alive() and results[i] is None and not pipes[i].poll()
                for i, p in enumerate(procs)
            ):
                shared.stop.set()
                break
    except KeyboardInterrupt:
        end_reason = "cancel"
        shared.stop.set()
        for i, pipe in enumerate(pipes):
            if results[i] is None and pipe.poll(10):
                results[i] = pipe.recv()
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    wall = time.monotonic() - t0
    return _merge(
        workload, end_reason, started_ns, wall, results, cpu_seen, open_peak, hold_samples
    )


def _expected_open(cfg: GhzConfig) -> int:
    return min(cfg.concurrency, cfg.total) if cfg.total else cfg.concurrency


def _merge(
    workload: Workload,
    end_reason: str,
    started_ns: int,
    wall: float,
    results: list[dict[str, Any] | None],
    cpu_seen: list[float],
    open_peak: int,
    hold_samples: dict[str, Any],
) -> RunResult:
    details: list[tuple[int, int, str, str]] = []
    codes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    streams = {label: _Samples() for label in LABELS}
    count = latency_sum = 0
    util: list[float] = []
    cpu_total = 0.0
    first, last = 0, 0
    retries = retried_calls = 0
    retry_reasons: Counter[str] = Counter()
    for i, res in enumerate(results):
        if res is None:
            codes["Unknown"] += 0
            util.append(cpu_seen[i] / wall if wall else 0.0)
            cpu_total += cpu_seen[i]
            continue
        details += res["details"]
        retries += res["open_retries"]
        retried_calls += res["open_retried_calls"]
        retry_reasons.update(res["open_retry_reasons"])
        count += res["count"]
        latency_sum += res["latency_sum"]
        codes.update(res["status_codes"])
        errors.update(res["errors"])
        for label in LABELS:
            streams[label].merge(res["streams"][label])
        cpu = res["cpu"]  # /proc figures include the spawn's imports; the worker's own do not
        cpu_total += cpu
        util.append(cpu / res["wall"] if res["wall"] else 0.0)
        if res["first_delta_ns"]:
            first = min(first, res["first_delta_ns"]) if first else res["first_delta_ns"]
            last = max(last, res["last_delta_ns"])
    skip = workload.config.skip_first
    if skip:
        details.sort()
        dropped, details = details[:skip], details[skip:]
        for _, lat, status, err in dropped:
            count -= 1
            latency_sum -= lat
            codes[status] -= 1
            if err:
                errors[err] -= 1
        codes = +codes
        errors = +errors
    details.sort()
    return RunResult(
        workload=workload,
        end_reason=end_reason,
        started_ns=started_ns,
        wall=wall,
        details=details,
        count=count,
        status_codes=codes,
        errors=errors,
        latency_sum_ns=latency_sum,
        streams=streams,
        client_cpu=cpu_total,
        client_process_utilization=util,
        open_peak=open_peak,
        stream_wall=(last - first) / 1e9 if last > first else 0.0,
        hold_samples=hold_samples,
        open_retries=retries,
        open_retried_calls=retried_calls,
        open_retry_reasons=retry_reasons,
    )

"""The benchmark scenarios of issue 6 (`python -m bench scenarios`, `make bench`).

Each scenario starts its own private Redis, simulated upstream and server
process(es) on loopback, runs the load tool, prints a table and writes
``<scenario>.json``, ``<scenario>.md`` and ``<scenario>.png`` into the
results directory. Every helper process is killed when the scenario ends,
whatever happens. Figures are ratios or differences against a reference
measured in the same run: absolute times on a shared 2-core machine drift.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from bench import load, report
from bench.config import GhzConfig
from bench.procs import ProcessGroup, ProcSampler, free_port, loadavg, proc_cpu, proc_rss

__all__ = ["SCENARIOS", "run_scenarios"]

MS = 1e6  # ns per ms
KIB = 1024
QUESTION = "What is the baggage allowance on my booking?"


@dataclass
class Ctx:
    quick: bool
    results: Path
    processes: int
    baseline: str | None = None
    """A second interpreter (a baseline checkout's venv): `cpu` and `capacity` run it too."""
    open_streams: tuple[int, ...] = ()
    """`open`: these stream counts instead of its defaults (e.g. 100,000)."""
    open_rate: float = 500.0
    """`open`: streams the client starts per second (0: as fast as it can)."""
    open_heartbeat: float | None = None
    """`open`: the server's KORERO_HEARTBEAT_INTERVAL (None: its default, 15 s)."""

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def chat_config(
    host: str,
    *,
    turns: int,
    concurrency: int,
    connections: int,
    total: int = 0,
    duration: float = 0.0,
    interval: float = 0.0,
    timeout: float = 120.0,
    name: str = "",
    max_duration: float = 0.0,
) -> GhzConfig:
    """A Chat workload: start, then `turns` messages with unique client_message_ids."""
    data: list[dict[str, Any]] = [
        {"start": {"metadata": {"customer_name": "Bench {{randomString 6}}"}}}
    ]
    if turns:
        data.append(
            {
                "message": {
                    "client_message_id": "{{.WorkerID}}-{{.RequestNumber}}-{{newUUID}}",
                    "text": QUESTION,
                }
            }
        )
    return GhzConfig(
        call="korero.chat.v1.ChatService.Chat",
        host=host,
        name=name,
        total=total or concurrency,
        concurrency=concurrency,
        connections=connections,
        duration=duration,
        max_duration=max_duration,
        timeout=timeout,
        data=data,
        stream_interval=interval,
        stream_call_count=turns + 1 if turns else 0,
    ).validate()


def _progress(label: str) -> Callable[[float, int, int, int], None]:
    def show(elapsed: float, done: int, failed: int, open_now: int) -> None:
        print(
            f"    {label} [{elapsed:5.1f}s] calls {done} errors {failed} open {open_now}",
            file=sys.stderr,
            flush=True,
        )

    return show


def _ms(ns: float) -> str:
    return f"{ns / MS:.2f}"


def table(title: str, headers: list[str], rows: list[list[Any]]) -> str:
    """Print a table and return it as Markdown."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    md = [f"| {' | '.join(headers)} |", f"|{'|'.join('---' for _ in headers)}|"]
    md += [f"| {' | '.join(r)} |" for r in cells]
    return "\n".join(md)


def _save(ctx: Ctx, name: str, data: dict[str, Any], md: str) -> None:
    data = {
        "scenario": name,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": ctx.quick,
        "versions": report.versions(),
        "commit": _commit(),
        **data,
    }
    report.write_json(ctx.results / f"{name}.json", data)
    (ctx.results / f"{name}.md").write_text(md + "\n")


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH
            capture_output=True, text=True, check=False, cwd=Path(__file__).parent,
        )  # fmt: skip
    except OSError:
        return ""
    return out.stdout.strip()


def _plot(ctx: Ctx, name: str, draw: Callable[[Any], None]) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print(f"  (matplotlib missing: no {name}.png; pip install '.[bench]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(ctx.results / f"{name}.png", dpi=110)
    plt.close(fig)


def _cdf(ax: Any, values: list[int], label: str) -> None:
    ordered = sorted(v / MS for v in values)
    if ordered:
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)


def _write_run(ctx: Ctx, stem: str, result: load.RunResult, server: dict[str, Any]) -> None:
    report.write_json(ctx.results / f"{stem}.ghz.json", report.ghz_report(result))
    report.write_json(ctx.results / f"{stem}.stream.json", report.streaming_report(result, server))


def _run(
    workload: load.Workload, pids: list[int], label: str, **kwargs: Any
) -> tuple[load.RunResult, dict[str, Any]]:
    with ProcSampler(pids) as sampler:
        result = load.run(workload, on_progress=_progress(label), **kwargs)
    return result, sampler.summary()


def _pct(values: list[int], p: float) -> float:
    return float(report.percentile(sorted(values), p))


# -- 1. added time to first token -----------------------------------------------------------


def scenario_ttft(ctx: Ctx) -> dict[str, Any]:
    rows, out, samples = [], {}, {}
    load0 = loadavg()
    for name, python in _variants(ctx):
        with ProcessGroup() as g:
            redis_url, _, _ = g.redis()
            llm, _ = g.sim(ttft_ms=20, tokens_per_second=100, answer_tokens=12)
            port, servers = g.servers(1, redis_url=redis_url, llm_url=llm, python=python)
            host = f"127.0.0.1:{port}"
            cases = [
                ("1 client", 1, 1, 1, ctx.size(300, 60)),
                ("50 in flight", 50, 4, ctx.processes, ctx.size(20, 8)),
                ("1,000 active", ctx.size(1000, 200), 8, ctx.processes, ctx.size(6, 3)),
            ]
            for label, conc, conns, procs, turns in cases:
                cfg = chat_config(
                    host, turns=turns, concurrency=conc, connections=conns,
                    interval=0.0 if conc <= 50 else 0.2, name=f"ttft {label}",
                )  # fmt: skip
                wl = load.Workload(cfg, processes=procs, direct_base_url=llm)
                result, server = _run(wl, [p.pid for p in servers], f"ttft {name} {label}")
                _write_run(ctx, f"ttft-{name.replace(' ', '-')}-{conc}", result, server)
                k, d = result.streams["korero"], result.streams["direct"]
                added50 = _pct(k.ttfd, 50) - _pct(d.ttfd, 50)
                added99 = _pct(k.ttfd, 99) - _pct(d.ttfd, 99)
                targets = {1: (1 * MS, 3 * MS), 50: (None, 5 * MS)}.get(conc, (None, 25 * MS))
                ok50 = "-" if targets[0] is None else ("yes" if added50 <= targets[0] else "NO")
                ok99 = "yes" if added99 <= targets[1] else "NO"
                rows.append(
                    [
                        name, label, k.turns, _ms(_pct(d.ttfd, 50)), _ms(_pct(k.ttfd, 50)),
                        _ms(added50),
                        _ms(_pct(d.ttfd, 99)), _ms(_pct(k.ttfd, 99)), _ms(added99),
                        f"{ok50}/{ok99}", "yes" if result.client_bound else "no",
                        f"{server['cpuUtilization']:.2f}",
                    ]
                )  # fmt: skip
                out[f"{name}: {label}"] = {
                    "kororoTurns": k.turns,
                    "directTurns": d.turns,
                    "turnErrors": dict(k.turn_errors)
                    | {f"direct:{e}": n for e, n in d.turn_errors.items()},
                    "directTtftNs": report.stats(d.ttfd),
                    "koreroTtftNs": report.stats(k.ttfd),
                    "addedP50Ns": added50,
                    "addedP99Ns": added99,
                    "clientBound": result.client_bound,
                    "clientUtilization": result.client_process_utilization,
                    "server": server,
                }
                samples[f"{name}, {label}"] = (d.ttfd, k.ttfd)
    md = table(
        "1. Added time to first token (Kōrero − direct to the upstream; ms; sim TTFT 20 ms; "
        f"load average {load0:.2f} → {loadavg():.2f})",
        ["server", "load", "turns", "direct p50", "korero p50", "added p50", "direct p99",
         "korero p99", "added p99", "target met (p50/p99)", "client-bound", "server CPU"],
        rows,
    )  # fmt: skip

    def draw(ax: Any) -> None:
        for label, (d, k) in samples.items():
            _cdf(ax, d, f"direct, {label}")
            _cdf(ax, k, f"Kōrero, {label}")
        ax.set_xscale("log")
        ax.set_xlabel("time to first token (ms, log)")
        ax.set_ylabel("fraction of turns")
        ax.set_title("Time to first token: direct vs through Kōrero")
        ax.legend(fontsize=8)

    _plot(ctx, "ttft", draw)
    return {"cases": out, "table": md}


# -- 2. throughput vs raw grpcio -------------------------------------------------------------


def scenario_throughput(ctx: Ctx) -> dict[str, Any]:
    conc = ctx.size(200, 50)
    duration = ctx.size(15, 5)
    answer_tokens = 200
    out: dict[str, Any] = {}
    with ProcessGroup() as g:
        port, echo = g.echo_server()
        cfg = dataclasses.replace(
            chat_config(f"127.0.0.1:{port}", turns=0, concurrency=conc, connections=4),
            data=[{"start": {}}],
            total=0,
            duration=duration,
            name="echo reference",
        ).validate()
        wl = load.Workload(cfg, processes=ctx.processes, echo=True, echo_messages=200)
        result, server = _run(wl, [echo.pid], "echo")
        _write_run(ctx, "throughput-echo", result, server)
        e = result.streams["echo"]
        echo_rate = e.deltas / (result.stream_wall or result.wall)
        out["echo"] = {
            "messagesPerSecond": echo_rate,
            "bytesPerSecond": e.text_bytes / (result.stream_wall or result.wall),
            "clientBound": result.client_bound,
            "server": server,
        }
    for window in (30.0, 0.0):
        with ProcessGroup() as g:
            redis_url, _, _ = g.redis()
            llm, _ = g.sim(ttft_ms=0, tokens_per_second=0, answer_tokens=answer_tokens)
            port, servers = g.servers(
                1, redis_url=redis_url, llm_url=llm,
                env={"KORERO_COALESCE_WINDOW_MS": str(window)},
            )  # fmt: skip
            cfg = chat_config(
                f"127.0.0.1:{port}", turns=10_000, concurrency=conc, connections=4,
                duration=duration, name=f"throughput window {window:g} ms",
            )  # fmt: skip
            wl = load.Workload(cfg, processes=ctx.processes)
            result, server = _run(wl, [p.pid for p in servers], f"korero window {window:g}")
            _write_run(ctx, f"throughput-korero-{window:g}ms", result, server)
            k = result.streams["korero"]
            wall = result.stream_wall or result.wall
            done_turns = k.turns - sum(k.turn_errors.values())
            tokens_rate = done_turns * answer_tokens / wall
            out[f"korero_{window:g}ms"] = {
                "turns": k.turns,
                "turnErrors": dict(k.turn_errors),
                "deltasPerSecond": k.deltas / wall,
                "bytesPerSecond": k.text_bytes / wall,
                "tokensPerSecond": tokens_rate,
                "ttfdNs": report.stats(k.ttfd),
                "clientBound": result.client_bound,
                "server": server,
            }
    rows = [["raw grpcio echo", f"{echo_rate:.0f}", f"{echo_rate:.0f}", "-", "1.00", "-", "-"]]
    for window in (30.0, 0.0):
        k = out[f"korero_{window:g}ms"]
        rows.append(
            [
                f"Kōrero, coalesce {window:g} ms", f"{k['deltasPerSecond']:.0f}",
                f"{k['tokensPerSecond']:.0f}", f"{k['bytesPerSecond'] / KIB:.0f}",
                f"{k['tokensPerSecond'] / echo_rate:.2f}", _ms(k["ttfdNs"].get("p50", 0)),
                f"{k['server']['cpuUtilization']:.2f}",
            ]
        )  # fmt: skip
    ratio = out["korero_30ms"]["tokensPerSecond"] / echo_rate
    out["ratio"] = ratio
    md = table(
        f"2. Throughput vs raw grpcio (ratio = Kōrero tokens/s ÷ echo messages/s; target ≥ 3×: "
        f"{'met' if ratio >= 3 else 'MISSED'})",
        ["server", "messages/s", "tokens/s", "text KiB/s", "ratio", "first delta p50 ms",
         "server CPU"],
        rows,
    )  # fmt: skip

    def draw(ax: Any) -> None:
        names = ["echo msgs/s", "Kōrero tokens/s\n(30 ms)", "Kōrero msgs/s\n(30 ms)",
                 "Kōrero tokens/s\n(0 ms)", "Kōrero msgs/s\n(0 ms)"]  # fmt: skip
        values = [
            echo_rate,
            out["korero_30ms"]["tokensPerSecond"],
            out["korero_30ms"]["deltasPerSecond"],
            out["korero_0ms"]["tokensPerSecond"],
            out["korero_0ms"]["deltasPerSecond"],
        ]
        ax.bar(names, values, color=["grey", "C0", "C0", "C1", "C1"])
        ax.set_ylabel("per second")
        ax.set_title("Delivered throughput vs a raw grpcio echo server")
        ax.tick_params(axis="x", labelsize=8)

    _plot(ctx, "throughput", draw)
    return {**out, "table": md}


# -- 3. open conversations ------------------------------------------------------------------


OPEN_RETRIES = 1000  # per stream: a refused open (RetryInfo) is sent again at most this often


def scenario_open(ctx: Ctx) -> dict[str, Any]:
    levels = list(ctx.open_streams) or ([200, 1000] if ctx.quick else [1000, 5000, 10000])
    rows, out = [], {}
    points: list[tuple[int, float]] = []
    load0 = loadavg()
    for n in levels:
        # Long enough to open every stream at the client's rate (or ~300/s unpaced), then hold.
        opening = n / (ctx.open_rate or 300.0)
        hold = max(120.0, 2 * opening + 60)
        with ProcessGroup() as g:
            redis_url, _, _ = g.redis()
            llm, _ = g.sim(ttft_ms=10, tokens_per_second=200, answer_tokens=20)
            env: dict[str, str] = {}
            if ctx.open_heartbeat is not None:
                env["KORERO_HEARTBEAT_INTERVAL"] = str(ctx.open_heartbeat)
            port, servers = g.servers(1, redis_url=redis_url, llm_url=llm, env=env)
            pid = servers[0].pid
            host = f"127.0.0.1:{port}"
            warm = chat_config(host, turns=1, concurrency=20, connections=4, total=40)
            load.run(load.Workload(warm, processes=1, progress=False))
            time.sleep(1.0)
            rss_before = proc_rss(pid)
            cfg = chat_config(
                host, turns=1, concurrency=n, connections=max(4, n // 500), total=n,
                timeout=hold + 120, max_duration=hold + 180, name=f"open {n}",
            )  # fmt: skip
            # The client starts streams at `open_rate` (ghz --rps); the server paces what it
            # cannot open at once (SESSION_OPENS_BUSY with RetryInfo), which the client honours.
            cfg = dataclasses.replace(cfg, rps=ctx.open_rate)
            wl = load.Workload(
                cfg, processes=ctx.processes, hold=hold, active_every=20,
                open_retries=OPEN_RETRIES,
            )  # fmt: skip

            def at_peak(open_now: int, pid: int = pid) -> dict[str, Any]:
                time.sleep(2.0)  # let the last turns finish and the allocator settle
                return {"openStreams": open_now, "rssBytes": proc_rss(pid)}

            result, server = _run(wl, [pid], f"open {n}", on_all_open=at_peak)
            _write_run(ctx, f"open-{n}", result, server)
            held = result.hold_samples or {"openStreams": 0, "rssBytes": 0}
            ok = result.status_codes.get("OK", 0)
            per_stream = (held["rssBytes"] - rss_before) / max(1, held["openStreams"])
            points.append((n, per_stream / KIB))
            failed = {k: v for k, v in result.status_codes.items() if k != "OK"}
            rows.append(
                [
                    n, held["openStreams"], f"{100 * ok / n:.2f} %",
                    f"{result.open_retries} ({result.open_retried_calls} streams)",
                    ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) or "none",
                    f"{rss_before / KIB / KIB:.0f}", f"{held['rssBytes'] / KIB / KIB:.0f}",
                    f"{per_stream / KIB:.1f}",
                    "yes" if per_stream <= 20 * KIB and ok == n else "NO",
                    "yes" if result.client_bound else "no",
                ]
            )  # fmt: skip
            print(
                f"  open {n}: held {held['openStreams']} at peak, OK {ok}, retried "
                f"{result.open_retries} times ({result.open_retried_calls} streams; "
                f"{dict(result.open_retry_reasons)}), failed {failed or 'none'}, "
                f"server RSS {rss_before / KIB / KIB:.0f} -> "
                f"{held['rssBytes'] / KIB / KIB:.0f} MiB "
                f"({per_stream / KIB:.1f} KiB/stream), wall {result.wall:.0f}s",
                file=sys.stderr,
                flush=True,
            )
            out[str(n)] = {
                "openAtPeak": held["openStreams"],
                "ok": ok,
                "openRetries": result.open_retries,
                "openRetriedStreams": result.open_retried_calls,
                "openRetryReasons": dict(result.open_retry_reasons),
                "openRate": ctx.open_rate,
                "heartbeatInterval": ctx.open_heartbeat,
                "loadAverage": [load0, loadavg()],
                "wallSeconds": result.wall,
                "statusCodes": dict(result.status_codes),
                "errors": dict(result.errors),
                "rssBefore": rss_before,
                "rssAtPeak": held["rssBytes"],
                "rssPerStreamBytes": per_stream,
                "activeTurns": result.streams["korero"].turns,
                "turnErrors": dict(result.streams["korero"].turn_errors),
                "server": server,
            }
    md = table(
        "3. Open conversations (5 % send a turn; RSS of the server process; target 100 % and "
        "≤ 20 KiB per stream at 10,000; refused opens retried after RetryInfo's delay)",
        ["streams", "open at peak", "success", "retries", "failed", "RSS before MiB",
         "RSS open MiB", "KiB/stream", "target met", "client-bound"],
        rows,
    )  # fmt: skip

    def draw(ax: Any) -> None:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="measured")
        ax.axhline(20, color="red", linestyle="--", label="target 20 KiB")
        ax.set_xlabel("open Chat streams")
        ax.set_ylabel("server RSS per open stream (KiB)")
        ax.set_title("Memory per open conversation")
        ax.legend()

    _plot(ctx, "open", draw)
    return {"levels": out, "table": md}


# -- 4. turn latency at load ----------------------------------------------------------------


def _sim_requests(llm_url: str) -> list[dict[str, Any]]:
    url = llm_url.removesuffix("/v1") + "/_sim/requests"
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - loopback http
        data: list[dict[str, Any]] = json.loads(response.read())
    return data


def scenario_latency(ctx: Ctx) -> dict[str, Any]:
    sessions = ctx.size(1000, 100)
    turns = ctx.size(4, 2)
    with ProcessGroup() as g:
        redis_url, _, _ = g.redis()
        llm, _ = g.sim(ttft_ms=50, tokens_per_second=40, answer_tokens=20)
        port, servers = g.servers(1, redis_url=redis_url, llm_url=llm)
        cfg = chat_config(
            f"127.0.0.1:{port}", turns=turns, concurrency=sessions, connections=8,
            interval=2.0, name=f"turn latency {sessions} sessions",
        )  # fmt: skip
        result, server = _run(
            load.Workload(cfg, processes=ctx.processes), [p.pid for p in servers], "latency"
        )
        _write_run(ctx, "latency", result, server)
        upstream = [
            round((r["finished_at"] - r["received_at"]) * 1e9)
            for r in _sim_requests(llm)
            if r["finished_at"] is not None
        ]
    k = result.streams["korero"]
    p95k, p95u = _pct(k.turns_ns, 95), _pct(upstream, 95)
    p50k, p50u = _pct(k.turns_ns, 50), _pct(upstream, 50)
    rows = [
        [
            sessions, k.turns, sum(k.turn_errors.values()), _ms(p50u), _ms(p50k), _ms(p50k - p50u),
            _ms(p95u), _ms(p95k), _ms(p95k - p95u), "yes" if p95k - p95u <= 50 * MS else "NO",
            "yes" if result.client_bound else "no", f"{server['cpuUtilization']:.2f}",
        ]
    ]  # fmt: skip
    md = table(
        "4. Turn latency at load (client send → done, minus the upstream's own request time; ms)",
        ["sessions", "turns", "turn errors", "upstream p50", "korero p50", "added p50",
         "upstream p95", "korero p95", "added p95", "≤ 50 ms", "client-bound", "server CPU"],
        rows,
    )  # fmt: skip

    def draw(ax: Any) -> None:
        _cdf(ax, upstream, "upstream (sim's own request time)")
        _cdf(ax, k.turns_ns, "through Kōrero (client send → done)")
        ax.set_xlabel("turn latency (ms)")
        ax.set_ylabel("fraction of turns")
        ax.set_title(f"Turn latency at {sessions} sessions")
        ax.legend()

    _plot(ctx, "latency", draw)
    return {
        "sessions": sessions,
        "turns": k.turns,
        "turnErrors": dict(k.turn_errors),
        "upstreamNs": report.stats(upstream),
        "koreroNs": report.stats(k.turns_ns),
        "addedP95Ns": p95k - p95u,
        "clientBound": result.client_bound,
        "server": server,
        "table": md,
    }


# -- 5. Redis cost -------------------------------------------------------------------------


class RoundTripProxy:
    """A TCP proxy in front of Redis counting round trips: a client burst answered by Redis.

    A pipeline is one burst, so it counts once, as it costs one round trip.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.round_trips = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> RoundTripProxy:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(timeout=5)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        waiting = [False]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upward: bool) -> None:
            while data := await src.read(65536):
                if upward and not waiting[0]:
                    self.round_trips += 1
                waiting[0] = upward
                dst.write(data)
                await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))
        except (OSError, asyncio.CancelledError):
            writer.close()
            up_writer.close()


def _commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def scenario_redis(ctx: Ctx) -> dict[str, Any]:
    sessions, turns = ctx.size(50, 10), ctx.size(10, 4)
    with ProcessGroup() as g:
        _redis_url, rport, _ = g.redis()
        llm, _ = g.sim(answer_tokens=20)
        client = redis.Redis(port=rport)
        with RoundTripProxy(rport) as proxy:
            port, _servers = g.servers(
                1, redis_url=f"redis://127.0.0.1:{proxy.port}/0", llm_url=llm
            )
            host = f"127.0.0.1:{port}"
            # Warm-up loads the Lua scripts (the first call of each is a SCRIPT LOAD).
            # It also fills the server's Redis pool: new connections' HELLO is not a turn's cost.
            warm = chat_config(host, turns=2, concurrency=10, connections=2, total=20)
            load.run(load.Workload(warm, processes=1, progress=False))
            measured = {}
            for phase, n_turns in (("open", 0), ("turns", turns)):
                before, rt0 = _commandstats(client), proxy.round_trips
                cfg = chat_config(
                    host, turns=n_turns, concurrency=10, connections=2, total=sessions
                )
                result = load.run(load.Workload(cfg, processes=1, progress=False))
                after, rt1 = _commandstats(client), proxy.round_trips
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                delta["info"] = delta.get("info", 0) - 1  # our own INFO call
                measured[phase] = {
                    "commands": {k: v for k, v in delta.items() if v > 0},
                    "roundTrips": rt1 - rt0,
                    "turns": result.streams["korero"].turns,
                    "turnErrors": dict(result.streams["korero"].turn_errors),
                    "ok": result.status_codes.get("OK", 0),
                }
    open_rt = measured["open"]["roundTrips"] / sessions
    n = measured["turns"]["turns"]
    turn_rt = (measured["turns"]["roundTrips"] - open_rt * sessions) / n
    top_level = ("evalsha", "eval", "fcall", "script|load")

    def per(phase: str, count: float, which: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for cmd, calls in measured[phase]["commands"].items():
            base = measured["open"]["commands"].get(cmd, 0) / sessions * sessions
            value = (calls - base) if phase == "turns" else calls
            if which == "top" and cmd not in top_level and not cmd.startswith("eval"):
                continue
            out[cmd] = value / count
        return out

    turn_cmds = per("turns", n, "all")
    top = {k: v for k, v in turn_cmds.items() if k.startswith(("eval", "fcall"))}
    open_cmds = {k: v / sessions for k, v in measured["open"]["commands"].items()}
    rows = [
        ["session open (start)", f"{open_rt:.2f}", f"{sum(open_cmds.values()):.2f}",
         ", ".join(f"{k} {v:.2f}" for k, v in sorted(open_cmds.items()))],
        ["uncached turn", f"{turn_rt:.2f}", f"{sum(turn_cmds.values()):.2f}",
         ", ".join(f"{k} {v:.2f}" for k, v in sorted(turn_cmds.items()) if abs(v) >= 0.005)],
    ]  # fmt: skip
    md = table(
        f"5. Redis cost per operation ({sessions} sessions × {turns} turns; target ≤ 3 round trips "
        f"per uncached turn: {'met' if turn_rt <= 3 else 'MISSED'})",
        ["operation", "round trips", "commands (incl. inside Lua)", "by command"],
        rows,
    )

    def draw(ax: Any) -> None:
        names = sorted(k for k, v in turn_cmds.items() if v >= 0.005)
        ax.bar(names, [turn_cmds[k] for k in names])
        ax.axhline(turn_rt, color="red", linestyle="--", label=f"round trips/turn {turn_rt:.2f}")
        ax.set_ylabel("per uncached turn")
        ax.set_title("Redis commands per turn (INFO commandstats)")
        ax.tick_params(axis="x", labelsize=8, rotation=30)
        ax.legend()

    _plot(ctx, "redis", draw)
    return {
        "sessions": sessions,
        "turnsPerSession": turns,
        "roundTripsPerOpen": open_rt,
        "roundTripsPerTurn": turn_rt,
        "commandsPerTurn": turn_cmds,
        "topLevelPerTurn": top,
        "raw": measured,
        "table": md,
    }


# -- 6. scale-out ------------------------------------------------------------------------------


def scenario_scaleout(ctx: Ctx) -> dict[str, Any]:
    conc, duration = ctx.size(200, 40), ctx.size(20, 6)
    rows, out = [], {}
    for count in (1, 2):
        with ProcessGroup() as g:
            redis_url, _, rproc = g.redis()
            llm, sim = g.sim(answer_tokens=20)
            port, servers = g.servers(count, redis_url=redis_url, llm_url=llm)
            cfg = chat_config(
                f"127.0.0.1:{port}", turns=100_000, concurrency=conc, connections=8,
                duration=duration, name=f"scale-out {count}",
            )  # fmt: skip
            others = {"sim": sim.pid, "redis": rproc.pid}
            cpu0 = {k: proc_cpu(p) for k, p in others.items()}
            result, server = _run(
                load.Workload(cfg, processes=ctx.processes),
                [p.pid for p in servers],
                f"{count} srv",
            )
            other_cpu = {k: (proc_cpu(p) - cpu0[k]) / result.wall for k, p in others.items()}
            _write_run(ctx, f"scaleout-{count}", result, server)
            k = result.streams["korero"]
            wall = result.stream_wall or result.wall
            rate = (k.turns - sum(k.turn_errors.values())) / wall
            per_server = [
                proc_cpu(p.pid) for p in servers
            ]  # total CPU seconds each server used (incl. start-up)
            out[str(count)] = {
                "turnsPerSecond": rate,
                "turns": k.turns,
                "turnErrors": dict(k.turn_errors),
                "server": server,
                "serverCpuSecondsEach": per_server,
                "clientUtilization": result.client_process_utilization,
                "clientBound": result.client_bound,
                "otherCpuUtilization": other_cpu,
            }
            rows.append(
                [
                    count, f"{rate:.0f}", _ms(_pct(k.turns_ns, 50)), _ms(_pct(k.turns_ns, 95)),
                    f"{server['cpuUtilization']:.2f}",
                    f"{sum(result.client_process_utilization):.2f}",
                    f"{other_cpu['sim']:.2f}", f"{other_cpu['redis']:.2f}",
                    "yes" if result.client_bound else "no",
                ]
            )  # fmt: skip
    ratio = out["2"]["turnsPerSecond"] / out["1"]["turnsPerSecond"]
    md = table(
        f"6. Scale-out: 1 vs 2 `korero serve` processes on one port (SO_REUSEPORT); "
        f"2/1 = {ratio:.2f}× (target ≥ 1.7×: {'met' if ratio >= 1.7 else 'MISSED'}); CPU in cores",
        ["servers", "turns/s", "turn p50 ms", "turn p95 ms", "server CPU", "client CPU",
         "sim CPU", "redis CPU", "client-bound"],
        rows,
    )  # fmt: skip

    def draw(ax: Any) -> None:
        ax.bar(["1 server", "2 servers"], [out["1"]["turnsPerSecond"], out["2"]["turnsPerSecond"]])
        ax.set_ylabel("completed turns/s")
        ax.set_title(f"Scale-out on one port: {ratio:.2f}×")

    _plot(ctx, "scaleout", draw)
    return {**out, "ratio": ratio, "table": md}


# -- 7. CPU per streamed turn at a fixed offered load -------------------------------------------

# The upstream: 50 ms to the first token, then 32 tokens 20 ms apart.
TURN_SIM = {"ttft_ms": 50.0, "tokens_per_second": 50.0, "answer_tokens": 32}


def _variants(ctx: Ctx) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = [("this tree", None)]
    if ctx.baseline:
        out.append(("baseline", ctx.baseline))
    return out


def _warm(host: str) -> None:
    warm = chat_config(host, turns=2, concurrency=10, connections=2, total=10)
    load.run(load.Workload(warm, processes=1, progress=False))
    time.sleep(0.5)


def scenario_cpu(ctx: Ctx) -> dict[str, Any]:
    """Server CPU seconds (from /proc) per completed turn at a load that leaves headroom.

    40 conversations of 15 turns, 0.25 s between turns (≈ 40 turns/s offered, a
    fraction of a core), so queueing and machine noise hardly change the figure.
    With a baseline interpreter the variants alternate round by round.
    """
    conc, turns = ctx.size(40, 20), ctx.size(15, 6)
    rounds = ctx.size(3, 2)
    per: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in _variants(ctx)}
    load0 = loadavg()
    with ProcessGroup() as g:
        redis_url, _, _ = g.redis()
        llm, _ = g.sim(**TURN_SIM)
        for r in range(rounds):
            order = _variants(ctx) if r % 2 == 0 else list(reversed(_variants(ctx)))
            for name, python in order:
                port, servers = g.servers(1, redis_url=redis_url, llm_url=llm, python=python)
                host, pid = f"127.0.0.1:{port}", servers[0].pid
                _warm(host)
                cfg = chat_config(
                    host, turns=turns, concurrency=conc, connections=4, total=conc,
                    interval=0.25, name=f"cpu {name}",
                )  # fmt: skip
                la = loadavg()
                cpu0, t0 = proc_cpu(pid), time.monotonic()
                result = load.run(load.Workload(cfg, processes=ctx.processes, progress=False))
                cpu, wall = proc_cpu(pid) - cpu0, time.monotonic() - t0
                g.stop(servers[0])
                k = result.streams["korero"]
                ok = k.turns - sum(k.turn_errors.values())
                per[name].append(
                    {
                        "cpuSeconds": cpu,
                        "turns": ok,
                        "turnErrors": dict(k.turn_errors),
                        "cpuMsPerTurn": 1000 * cpu / max(1, ok),
                        "turnsPerSecond": ok / wall,
                        "serverUtilization": cpu / wall,
                        "loadavg": la,
                        "clientBound": result.client_bound,
                        "ttftP50Ns": _pct(k.ttfd, 50),
                    }
                )
                print(
                    f"    cpu {name} round {r + 1}: {per[name][-1]['cpuMsPerTurn']:.2f} ms/turn "
                    f"({ok} turns, load {la:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
    rows = []
    out: dict[str, Any] = {"loadavgBefore": load0, "loadavgAfter": loadavg()}
    for name, runs in per.items():
        median = statistics.median(x["cpuMsPerTurn"] for x in runs)
        out[name] = {"runs": runs, "cpuMsPerTurnMedian": median}
        rows.append(
            [
                name, len(runs), sum(x["turns"] for x in runs),
                sum(sum(x["turnErrors"].values()) for x in runs),
                " / ".join(f"{x['cpuMsPerTurn']:.2f}" for x in runs), f"{median:.2f}",
                f"{statistics.median(x['turnsPerSecond'] for x in runs):.0f}",
                f"{statistics.median(x['serverUtilization'] for x in runs):.2f}",
                "yes" if median <= 2.0 else "NO",
                " / ".join(f"{x['loadavg']:.2f}" for x in runs),
            ]
        )  # fmt: skip
    md = table(
        f"7. Server CPU per streamed turn (32 tokens, sim TTFT 50 ms, 20 ms apart; {conc} "
        f"conversations × {turns} turns, 0.25 s apart; load average {load0:.2f} → "
        f"{out['loadavgAfter']:.2f})",
        ["server", "rounds", "turns", "turn errors", "CPU ms/turn per round", "median",
         "turns/s", "server CPU", "≤ 2 ms", "load average per round"],
        rows,
    )  # fmt: skip
    return {**out, "table": md}


# -- 8. capacity: turns/s one process sustains with added TTFT p99 ≤ 25 ms -----------------


def scenario_capacity(ctx: Ctx) -> dict[str, Any]:
    """Raise the offered load until added TTFT p99 passes 25 ms; report turns/s there.

    Each conversation alternates a Kōrero turn and the same turn straight to the
    upstream (the reference), back to back, so the offered load grows with the
    number of conversations. Client, upstream and server share the machine.
    """
    levels = [20, 50, 100, 150, 200, 300] if ctx.quick else [
        20, 50, 100, 150, 200, 250, 300, 400, 500, 600,
    ]  # fmt: skip
    duration = ctx.size(15, 8)
    out: dict[str, Any] = {"loadavgBefore": loadavg()}
    rows = []
    for name, python in _variants(ctx):
        best = 0.0
        steps = []
        with ProcessGroup() as g:
            redis_url, _, _ = g.redis()
            llm, _ = g.sim(**TURN_SIM)
            port, servers = g.servers(1, redis_url=redis_url, llm_url=llm, python=python)
            host = f"127.0.0.1:{port}"
            _warm(host)
            for conc in levels:
                cfg = chat_config(
                    host, turns=100_000, concurrency=conc, connections=max(4, conc // 50),
                    duration=duration, name=f"capacity {name} {conc}",
                )  # fmt: skip
                # Streams start spread over one turn's time, not all in the same instant.
                cfg = dataclasses.replace(cfg, rps=conc / 0.7)
                la = loadavg()
                result, server = _run(
                    load.Workload(cfg, processes=ctx.processes, direct_base_url=llm),
                    [p.pid for p in servers],
                    f"capacity {name} {conc}",
                )
                k, d = result.streams["korero"], result.streams["direct"]
                ok = k.turns - sum(k.turn_errors.values())
                rate = ok / result.wall
                added50 = _pct(k.ttfd, 50) - _pct(d.ttfd, 50)
                added99 = _pct(k.ttfd, 99) - _pct(d.ttfd, 99)
                met = added99 <= 25 * MS and not k.turn_errors
                steps.append(
                    {
                        "conversations": conc,
                        "turnsPerSecond": rate,
                        "turnErrors": dict(k.turn_errors),
                        "addedP50Ns": added50,
                        "addedP99Ns": added99,
                        "directTtftNs": report.stats(d.ttfd),
                        "koreroTtftNs": report.stats(k.ttfd),
                        "server": server,
                        "clientUtilization": result.client_process_utilization,
                        "clientBound": result.client_bound,
                        "loadavg": la,
                    }
                )
                rows.append(
                    [
                        name, conc, f"{rate:.0f}", _ms(added50), _ms(added99),
                        sum(k.turn_errors.values()), f"{server['cpuUtilization']:.2f}",
                        f"{sum(result.client_process_utilization):.2f}",
                        "yes" if met else "NO", f"{la:.2f}",
                    ]
                )  # fmt: skip
                if not met:
                    break
                best = max(best, rate)
        out[name] = {"steps": steps, "turnsPerSecondAtTarget": best}
    out["loadavgAfter"] = loadavg()
    summary = ", ".join(f"{n}: {out[n]['turnsPerSecondAtTarget']:.0f}" for n, _ in _variants(ctx))
    md = table(
        f"8. Capacity: Kōrero turns/s with added TTFT p99 ≤ 25 ms ({summary} turns/s; "
        f"sim TTFT 50 ms, 32 tokens 20 ms apart; load average {out['loadavgBefore']:.2f} → "
        f"{out['loadavgAfter']:.2f})",
        ["server", "conversations", "turns/s", "added p50 ms", "added p99 ms", "turn errors",
         "server CPU", "client CPU", "p99 ≤ 25 ms", "load average"],
        rows,
    )  # fmt: skip
    return {**out, "table": md}


SCENARIOS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "ttft": scenario_ttft,
    "throughput": scenario_throughput,
    "open": scenario_open,
    "latency": scenario_latency,
    "redis": scenario_redis,
    "scaleout": scenario_scaleout,
    "cpu": scenario_cpu,
    "capacity": scenario_capacity,
    "workers": lambda ctx: _scenario_workers(ctx),  # noqa: PLW0108 - defined below
    "failover": lambda ctx: _scenario_failover(ctx),  # noqa: PLW0108 - defined below
}


# Scenarios with modules of their own (which import this one).
def _scenario_workers(ctx: Ctx) -> dict[str, Any]:
    from bench.workers import scenario_workers  # noqa: PLC0415

    return scenario_workers(ctx)


def _scenario_failover(ctx: Ctx) -> dict[str, Any]:
    from bench.failover import scenario_failover  # noqa: PLC0415

    return scenario_failover(ctx)


def run_scenarios(
    only: list[str] | None,
    *,
    quick: bool,
    results: Path,
    processes: int = 2,
    baseline: str | None = None,
    open_streams: tuple[int, ...] = (),
    open_rate: float = 500.0,
    open_heartbeat: float | None = None,
) -> int:
    """Run the chosen scenarios (all by default); 1 if any failed to run."""
    load.raise_fd_limit()

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: helpers are killed

    signal.signal(signal.SIGTERM, interrupt)
    results.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(
        quick=quick,
        results=results,
        processes=processes,
        baseline=baseline,
        open_streams=open_streams,
        open_rate=open_rate,
        open_heartbeat=open_heartbeat,
    )
    failed = []
    tables = []
    for name in only or list(SCENARIOS):
        print(
            f"\n=== {name}{' (quick)' if quick else ''} (load average {loadavg():.2f}) ===",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.monotonic()
        try:
            data = SCENARIOS[name](ctx)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        tables.append(data.pop("table"))
        _save(ctx, name, data, tables[-1])
        print(f"  ({name}: {time.monotonic() - t0:.0f}s)", file=sys.stderr)
    print(f"\nresults in {results}/ (grpcio {report.versions()['grpcio']})")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0

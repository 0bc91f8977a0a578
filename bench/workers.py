"""`korero serve --workers N`: throughput and added time to first token at 1 and 2
workers, measured in one run (`python -m bench scenarios --only workers`).

For each worker count a fresh Redis, simulated upstream and `korero serve
--workers N` (one supervisor, N worker processes on one port) are started and
two loads are run:

- **throughput**: back-to-back turns from many conversations over 8
  connections (the kernel spreads connections, not calls, over the workers);
  sim: no TTFT, unlimited rate, 20 tokens — turns/s, and the CPU each process
  used, from which *turns/s per server core* = turns/s ÷ the cores the
  workers used;
- **added TTFT**: 50 conversations taking turns with 200 ms pauses (sim TTFT
  20 ms, 100 tokens/s), each turn also sent directly to the upstream by the
  load tool on the same path as the server: Kōrero − direct at p50 and p99.

The load generator, the simulated upstream and Redis share the machine's
cores with the server (2 here): their CPU is reported next to the server's,
and so is the load average before and after (the machine is shared).
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any

from bench import load, report
from bench.procs import ProcessGroup, ProcSampler, free_port, proc_cpu
from bench.scenarios import MS, Ctx, _ms, _pct, _plot, _progress, _write_run, chat_config, table

__all__ = ["scenario_workers"]


def _loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _serve(g: ProcessGroup, workers: int, redis_url: str, llm: str) -> tuple[int, int, list[int]]:
    """`korero serve --workers N` on a free port: (port, supervisor pid, worker pids)."""
    port = free_port()
    log_index = len(g.procs)
    proc = g._spawn(
        [sys.executable, "-m", "korero.client.cli", "serve", "--workers", str(workers)],
        env={
            "KORERO_LISTEN": f"127.0.0.1:{port}",
            "KORERO_WS_LISTEN": "off",
            "KORERO_METRICS_LISTEN": "off",
            "REDIS_URL": redis_url,
            "KORERO_LLM_BASE_URL": llm,
            "KORERO_LLM_API_KEY": "bench",
            "KORERO_LOG_LEVEL": "INFO",
            "KORERO_REDIS_MAX_CONNECTIONS": "256",
            "KORERO_SESSION_MESSAGES_PER_MINUTE": "1000000",
            "KORERO_TENANT_REQUESTS_PER_MINUTE": "1000000000",
            "KORERO_TENANT_TOKENS_PER_MINUTE": "1000000000000",
        },
    )
    log = g.workdir / f"proc-{log_index}.log"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if workers == 1 and "event=serving" in text:
            return port, proc.pid, [proc.pid]
        if "event=workers_serving" in text:
            pids = [int(p) for p in re.findall(r"event=worker_started worker=\d+ pid=(\d+)", text)]
            return port, proc.pid, pids
        if proc.poll() is not None:
            raise RuntimeError(f"korero serve exited: {text[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError("korero serve --workers did not start in time")


def scenario_workers(ctx: Ctx) -> dict[str, Any]:
    conc, duration = ctx.size(200, 40), ctx.size(20, 6)
    ttft_conc, ttft_turns = ctx.size(50, 20), ctx.size(6, 3)
    out: dict[str, Any] = {"loadAverageBefore": _loadavg(), "cores": os.cpu_count()}
    rows_tp, rows_ttft = [], []
    for workers in (1, 2):
        with ProcessGroup() as g:
            redis_url, _, rproc = g.redis()
            llm, sim = g.sim(answer_tokens=20)
            port, parent, pids = _serve(g, workers, redis_url, llm)
            host = f"127.0.0.1:{port}"
            cfg = chat_config(
                host, turns=100_000, concurrency=conc, connections=8, duration=duration,
                name=f"workers {workers} throughput",
            )  # fmt: skip
            others = {"sim": sim.pid, "redis": rproc.pid, "supervisor": parent}
            cpu0 = {k: proc_cpu(p) for k, p in others.items()} | {p: proc_cpu(p) for p in pids}
            with ProcSampler(pids) as sampler:
                result = load.run(
                    load.Workload(cfg, processes=ctx.processes),
                    on_progress=_progress(f"{workers} workers"),
                )
            server = sampler.summary()
            _write_run(ctx, f"workers-{workers}", result, server)
            wall = result.stream_wall or result.wall
            k = result.streams["korero"]
            rate = (k.turns - sum(k.turn_errors.values())) / wall
            per_worker = [(proc_cpu(p) - cpu0[p]) / result.wall for p in pids]
            other = {
                name: (proc_cpu(pid) - cpu0[name]) / result.wall for name, pid in others.items()
            }
            if workers == 1:
                other["supervisor"] = 0.0  # one process: no supervisor
            cores = sum(per_worker)
            client = sum(result.client_process_utilization)
            entry: dict[str, Any] = {
                "turnsPerSecond": rate,
                "turns": k.turns,
                "turnErrors": dict(k.turn_errors),
                "turnP50Ns": _pct(k.turns_ns, 50),
                "turnP95Ns": _pct(k.turns_ns, 95),
                "workerCpuCores": per_worker,
                "serverCores": cores,
                "turnsPerSecondPerServerCore": rate / cores if cores else 0.0,
                "clientCpuCores": client,
                "otherCpuCores": other,
                "clientBound": result.client_bound,
            }
            rows_tp.append(
                [
                    workers, f"{rate:.0f}", _ms(entry["turnP50Ns"]), _ms(entry["turnP95Ns"]),
                    " + ".join(f"{c:.2f}" for c in per_worker), f"{cores:.2f}",
                    f"{entry['turnsPerSecondPerServerCore']:.0f}", f"{other['supervisor']:.2f}",
                    f"{client:.2f}", f"{other['sim']:.2f}", f"{other['redis']:.2f}",
                    "yes" if result.client_bound else "no",
                ]
            )  # fmt: skip
            out[str(workers)] = entry
        with ProcessGroup() as g:
            redis_url, _, _ = g.redis()
            llm, _ = g.sim(ttft_ms=20, tokens_per_second=100, answer_tokens=12)
            port, _, pids = _serve(g, workers, redis_url, llm)
            cfg = chat_config(
                f"127.0.0.1:{port}", turns=ttft_turns, concurrency=ttft_conc, connections=8,
                interval=0.2, name=f"workers {workers} ttft",
            )  # fmt: skip
            with ProcSampler(pids) as sampler:
                result = load.run(
                    load.Workload(cfg, processes=ctx.processes, direct_base_url=llm),
                    on_progress=_progress(f"{workers} workers ttft"),
                )
            _write_run(ctx, f"workers-{workers}-ttft", result, sampler.summary())
            k, d = result.streams["korero"], result.streams["direct"]
            added50 = _pct(k.ttfd, 50) - _pct(d.ttfd, 50)
            added99 = _pct(k.ttfd, 99) - _pct(d.ttfd, 99)
            out[str(workers)] |= {
                "ttftTurns": k.turns,
                "addedTtftP50Ns": added50,
                "addedTtftP99Ns": added99,
                "koreroTtftNs": report.stats(k.ttfd),
                "directTtftNs": report.stats(d.ttfd),
            }
            rows_ttft.append(
                [
                    workers, k.turns, _ms(_pct(d.ttfd, 50)), _ms(_pct(k.ttfd, 50)), _ms(added50),
                    _ms(_pct(d.ttfd, 99)), _ms(_pct(k.ttfd, 99)), _ms(added99),
                    "yes" if added99 <= 25 * MS else "NO",
                ]
            )  # fmt: skip
    out["loadAverageAfter"] = _loadavg()
    ratio = out["2"]["turnsPerSecond"] / out["1"]["turnsPerSecond"]
    out["ratio"] = ratio
    load_note = f"load average {out['loadAverageBefore']:.2f} → {out['loadAverageAfter']:.2f}"
    md = table(
        f"7. Workers: `korero serve --workers N` on one port; 2/1 = {ratio:.2f}× "
        f"({load_note}; CPU in cores)",
        ["workers", "turns/s", "turn p50 ms", "turn p95 ms", "CPU per worker", "server cores",
         "turns/s per server core", "supervisor CPU", "client CPU", "sim CPU", "redis CPU",
         "client-bound"],
        rows_tp,
    )  # fmt: skip
    md += "\n\n" + table(
        f"7b. Added time to first token with {ttft_conc} conversations (Kōrero − direct; ms; "
        "target p99 ≤ 25 ms)",
        ["workers", "turns", "direct p50", "korero p50", "added p50", "direct p99",
         "korero p99", "added p99", "p99 target met"],
        rows_ttft,
    )  # fmt: skip

    def draw(ax: Any) -> None:
        ax.bar(["1 worker", "2 workers"], [out["1"]["turnsPerSecond"], out["2"]["turnsPerSecond"]])
        ax.set_ylabel("completed turns/s")
        ax.set_title(f"korero serve --workers: {ratio:.2f}×")

    _plot(ctx, "workers", draw)
    return {**out, "table": md}

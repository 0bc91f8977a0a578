"""Reports: ghz's JSON report (exactly its schema) and the streaming metrics file.

The ghz report follows `runner/reporter.go`: durations are integer
nanoseconds (Go's `time.Duration`), `date` is RFC 3339, detail timestamps are
RFC 3339 with nanoseconds, the latency distribution covers 10/25/50/75/90/95/99
with ghz's rank rule, the histogram has ghz's eleven buckets (marks in
seconds), and fastest/slowest/percentiles use successful calls only.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load import LABELS, RunResult

__all__ = [
    "SCHEMA_PATH",
    "ghz_report",
    "percentile",
    "stats",
    "streaming_report",
    "versions",
    "write_json",
]

SCHEMA_PATH = Path(__file__).parent / "schema" / "ghz-report.schema.json"
PERCENTAGES = (10, 25, 50, 75, 90, 95, 99)


def _rfc3339(ns: int, *, nanos: bool) -> str:
    dt = datetime.fromtimestamp(ns // 1_000_000_000, UTC)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        frac = f"{ns % 1_000_000_000:09d}".rstrip("0")  # Go's RFC3339Nano drops trailing zeros
        return f"{base}.{frac}Z" if frac else f"{base}Z"
    return f"{base}Z"


def percentile(sorted_values: Sequence[int], pct: float) -> int:
    """ghz's rank rule: the value at rank ceil(p/100 * n), 1-based."""
    if not sorted_values:
        return 0
    ip = pct / 100.0 * len(sorted_values)
    di = int(ip)
    if ip == di:
        di -= 1
    return sorted_values[max(0, min(di, len(sorted_values) - 1))]


def _histogram(ok: Sequence[int]) -> list[dict[str, Any]]:
    fastest, slowest = ok[0] / 1e9, ok[-1] / 1e9
    size = (slowest - fastest) / 10
    marks = [fastest + size * i for i in range(10)] + [slowest]
    counts = [0] * 11
    bucket = 0
    for value in ok:
        seconds = value / 1e9
        while seconds > marks[bucket] and bucket < 10:
            bucket += 1
        counts[bucket] += 1
    return [
        {"mark": marks[i], "count": counts[i], "frequency": counts[i] / len(ok)} for i in range(11)
    ]


def ghz_report(result: RunResult, *, include_details: bool = True) -> dict[str, Any]:
    """The run as ghz's JSON report (`format: json`)."""
    cfg = result.workload.config
    report: dict[str, Any] = {}
    if cfg.name:
        report["name"] = cfg.name
    report["endReason"] = result.end_reason
    report["options"] = cfg.to_options()
    report["date"] = _rfc3339(time.time_ns(), nanos=False)
    report["count"] = result.count
    report["total"] = round(result.wall * 1e9)
    report["average"] = 0
    report["fastest"] = 0
    report["slowest"] = 0
    report["rps"] = 0.0
    report["errorDistribution"] = dict(result.errors)
    report["statusCodeDistribution"] = dict(result.status_codes)
    report["latencyDistribution"] = None
    report["histogram"] = None
    report["details"] = None
    if result.details:
        report["average"] = round(result.latency_sum_ns / result.count) if result.count else 0
        report["rps"] = result.count / result.wall if result.wall else 0.0
        ok = sorted(lat for _, lat, _, err in result.details if not err)
        if ok:
            report["fastest"] = ok[0]
            report["slowest"] = ok[-1]
            report["histogram"] = _histogram(ok)
            report["latencyDistribution"] = [
                {"percentage": p, "latency": percentile(ok, p)} for p in PERCENTAGES
            ]
        if include_details:
            report["details"] = [
                {
                    "timestamp": _rfc3339(ts, nanos=True),
                    "latency": lat,
                    "error": err,
                    "status": status,
                }
                for ts, lat, status, err in result.details
            ]
    if cfg.tags:
        report["tags"] = dict(cfg.tags)
    return report


def stats(values: Sequence[int]) -> dict[str, Any]:
    """Count, mean and percentiles (ns) of a sample."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "mean": round(sum(ordered) / len(ordered)),
        "min": ordered[0],
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
    }


def versions() -> dict[str, str]:
    import grpc  # noqa: PLC0415

    return {
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": str(len(os.sched_getaffinity(0))),
    }


def streaming_report(
    result: RunResult, server: dict[str, Any] | None = None, *, name: str = ""
) -> dict[str, Any]:
    """Streaming figures ghz cannot measure: first delta, gaps, rates, client and server load."""
    wall = result.stream_wall or result.wall
    paths: dict[str, Any] = {}
    for label in LABELS:
        s = result.streams[label]
        if not (s.turns or s.deltas):
            continue
        paths[label] = {
            "turns": s.turns,
            "turnErrors": dict(s.turn_errors),
            "timeToFirstDeltaNs": stats(s.ttfd),
            "interDeltaGapNs": stats(s.gaps),
            "turnLatencyNs": stats(s.turns_ns),
            "deltas": s.deltas,
            "textBytes": s.text_bytes,
            "deltasPerSecond": s.deltas / wall if wall else 0.0,
            "bytesPerSecond": s.text_bytes / wall if wall else 0.0,
        }
    util = result.client_process_utilization
    return {
        "name": name or result.workload.config.name,
        "date": _rfc3339(time.time_ns(), nanos=False),
        "call": result.workload.config.spec.full_name,
        "versions": versions(),
        "wallSeconds": result.wall,
        "streamingSeconds": result.stream_wall,
        "openStreamsPeak": result.open_peak,
        "openRetries": result.open_retries,
        "openRetriedStreams": result.open_retried_calls,
        "openRetryReasons": dict(result.open_retry_reasons),
        "paths": paths,
        "client": {
            "processes": len(util),
            "cpuSeconds": result.client_cpu,
            "processUtilization": util,
            "clientBound": result.client_bound,
        },
        "server": server or {},
        **({"hold": result.hold_samples} if result.hold_samples else {}),
    }


def write_json(path: str | Path, data: Any) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, allow_nan=False, default=_jsonable)
    target.write_text(text + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summary_line(report: dict[str, Any]) -> str:
    """ghz-like one-paragraph summary for the terminal."""
    ms = 1e6
    lines = [
        f"Summary: {report.get('name', '')}",
        f"  Count:        {report['count']}",
        f"  Total:        {report['total'] / 1e9:.2f} s",
        f"  Slowest:      {report['slowest'] / ms:.2f} ms",
        f"  Fastest:      {report['fastest'] / ms:.2f} ms",
        f"  Average:      {report['average'] / ms:.2f} ms",
        f"  Requests/sec: {report['rps']:.2f}",
    ]
    if report["latencyDistribution"]:
        lines.append("Latency distribution:")
        lines += [
            f"  {d['percentage']} % in {d['latency'] / ms:.2f} ms"
            for d in report["latencyDistribution"]
        ]
    lines.append("Status code distribution:")
    lines += [f"  [{k}]   {v} responses" for k, v in report["statusCodeDistribution"].items()]
    if report["errorDistribution"]:
        lines.append("Error distribution:")
        lines += [f"  [{v}]   {k}" for k, v in report["errorDistribution"].items()]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use python -m bench")

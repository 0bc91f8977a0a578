"""``python -m bench``: the load tool (`run`) and the benchmark scenarios (`scenarios`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.config import ConfigError, load_config, parse_duration

__all__ = ["main"]

_RUN_EPILOG = """\
Flags override the config file's keys, as in ghz. A run ends when `total`
calls are done, or after `duration` (then `total` is ignored), and never later
than `max-duration` (default 600s). Every address should be loopback.

examples:
  python -m bench run --config bench/ghz/health.json --host 127.0.0.1:50051
  python -m bench run --config bench/ghz/chat.json -c 100 --connections 4 -n 400 \\
      --output bench/results/chat.json --stream-output bench/results/chat-stream.json
  python -m bench run --call korero.chat.v1.ChatService.SendMessage --host 127.0.0.1:50051 \\
      -d '{"message": {"client_message_id": "{{newUUID}}", "text": "hi"}}' -z 10s --rps 50
"""


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run one load test from a ghz config; write ghz's JSON report",
        description="Drive gRPC calls the way ghz does (config keys, flags and template "
        "variables), with several client processes, and write ghz's JSON report plus "
        "a file of streaming metrics.",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("ghz options (override the config file)")
    g.add_argument("--config", help="ghz JSON config file (bench/ghz/*.json)")
    g.add_argument("--call", help="fully-qualified method: package.Service.Method (or /)")
    g.add_argument("--host", help="HOST:PORT of the server (ghz's positional host)")
    g.add_argument(
        "--insecure", action="store_true", default=None, help="plaintext (the only mode here)"
    )
    g.add_argument("-n", "--total", type=int, help="number of calls to run (ghz default 200)")
    g.add_argument("-c", "--concurrency", type=int, help="concurrent call loops (ghz default 50)")
    g.add_argument(
        "--connections",
        type=int,
        help="gRPC connections (ghz default 1), spread over client processes",
    )
    g.add_argument(
        "-z", "--duration", help="run for this long (Go duration, e.g. 30s); total is then ignored"
    )
    g.add_argument("-x", "--max-duration", help="stop after this long even if total is not reached")
    g.add_argument(
        "--duration-stop",
        choices=["close", "wait", "ignore"],
        help="calls in flight when duration ends: close (reported as Canceled, default), "
        "wait, ignore",
    )
    g.add_argument(
        "-r", "--rps", type=float, help="call start rate limit over all processes (0: none)"
    )
    g.add_argument(
        "-t", "--timeout", help="deadline of each call (Go duration; ghz default 20s; 0 = none)"
    )
    g.add_argument("-d", "--data", help="call data as JSON (an array for a stream of messages)")
    g.add_argument("-m", "--metadata", help="request metadata as a JSON object")
    g.add_argument("--stream-interval", help="pause after each message of a stream (Go duration)")
    g.add_argument(
        "--stream-call-count", type=int, help="messages sent per stream (cycles through data)"
    )
    g.add_argument("--skip-first", type=int, help="leave the first N calls out of the report")
    g.add_argument("--name", help="name of the run, recorded in the report")
    g.add_argument(
        "-O", "--format", choices=["json", "pretty", "summary"], help="report format (default json)"
    )
    g.add_argument("-o", "--output", help="ghz report path (default: stdout)")
    t = p.add_argument_group("this tool")
    t.add_argument(
        "--stream-output", help="write streaming metrics (first delta, gaps, rates, RSS/CPU) here"
    )
    t.add_argument("-P", "--processes", type=int, default=2, help="client processes (default 2)")
    t.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        help="sample this server process's RSS and CPU (repeatable)",
    )
    t.add_argument(
        "--hold",
        help="Chat: keep every stream open after its data until all are open (at most this long)",
    )
    t.add_argument(
        "--active-every", type=int, default=1, help="Chat: only every n-th stream sends messages"
    )
    t.add_argument(
        "--open-retries",
        type=int,
        default=0,
        help="Chat: open a stream again after a refusal with RetryInfo, at most N times",
    )
    t.add_argument(
        "--no-details", action="store_true", help="leave the per-call details out of the report"
    )
    t.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_run)


def _add_scenarios(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from bench.scenarios import SCENARIOS  # noqa: PLC0415

    p = sub.add_parser(
        "scenarios",
        help="run the benchmark scenarios (the default command)",
        description="Start a private Redis, the simulated upstream and Kōrero server(s) on "
        "loopback, run each scenario, print its table and write JSON and PNG plots to "
        "bench/results/.",
        epilog="scenarios: " + ", ".join(SCENARIOS),
    )
    p.add_argument(
        "--only",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a minute or two in all")
    p.add_argument(
        "--results", default="bench/results", help="output directory (default bench/results)"
    )
    p.add_argument("-P", "--processes", type=int, default=2, help="client processes (default 2)")
    p.add_argument(
        "--open-streams",
        type=int,
        action="append",
        metavar="N",
        help="`open`: hold N streams instead of the default sizes (repeatable; e.g. 100000)",
    )
    p.add_argument(
        "--open-rate",
        type=float,
        default=500.0,
        help="`open`: streams the client starts per second (default 500; 0: as fast as it can)",
    )
    p.add_argument(
        "--open-heartbeat",
        type=float,
        metavar="SECONDS",
        help="`open`: the server's heartbeat interval (KORERO_HEARTBEAT_INTERVAL; default 15)",
    )
    p.add_argument(
        "--baseline-python",
        metavar="PYTHON",
        help="`cpu` and `capacity` also run servers with this interpreter (a baseline "
        "checkout's venv), alternating with this tree's, for an A/B in one run",
    )
    p.set_defaults(func=_scenarios)


def _run(args: argparse.Namespace) -> int:
    from bench import load, report  # noqa: PLC0415
    from bench.procs import ProcSampler  # noqa: PLC0415

    overrides: dict[str, Any] = {
        "call": args.call,
        "host": args.host,
        "insecure": args.insecure,
        "total": args.total,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "duration": args.duration,
        "max-duration": args.max_duration,
        "duration-stop": args.duration_stop,
        "rps": args.rps,
        "timeout": args.timeout,
        "data": json.loads(args.data) if args.data else None,
        "metadata": json.loads(args.metadata) if args.metadata else None,
        "stream-interval": args.stream_interval,
        "stream-call-count": args.stream_call_count,
        "skip-first": args.skip_first,
        "name": args.name,
        "format": args.format,
        "output": args.output,
    }
    try:
        cfg = load_config(args.config, overrides)
        hold = parse_duration(args.hold) if args.hold else 0.0
    except (ConfigError, json.JSONDecodeError) as exc:
        print(f"bench run: {exc}", file=sys.stderr)
        return 2
    workload = load.Workload(
        cfg,
        processes=args.processes,
        hold=hold,
        active_every=args.active_every,
        progress=not args.quiet,
        open_retries=args.open_retries,
    )
    if not args.quiet:
        print(
            f"bench: {cfg.spec.full_name} on {cfg.host}: concurrency {cfg.concurrency}, "
            f"connections {cfg.connections}, processes {args.processes}, "
            + (f"duration {cfg.duration:g}s" if cfg.duration else f"total {cfg.total}"),
            file=sys.stderr,
        )
    with ProcSampler(args.server_pid) as sampler:
        result = load.run(workload)
    ghz = report.ghz_report(result, include_details=not args.no_details)
    if cfg.format in {"json", "pretty"}:
        text = json.dumps(ghz, indent=2 if cfg.format == "pretty" else None)
    else:
        text = report.summary_line(ghz)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(text + "\n")
    else:
        print(text)
    if args.stream_output:
        server = sampler.summary() if args.server_pid else {}
        report.write_json(args.stream_output, report.streaming_report(result, server))
    if not args.quiet:
        if cfg.output:
            print(report.summary_line(ghz), file=sys.stderr)
        if result.client_bound:
            print(
                "bench: WARNING client-bound run (a client process saturated its CPU); "
                "add --processes or lower the load",
                file=sys.stderr,
            )
    return 0


def _scenarios(args: argparse.Namespace) -> int:
    from bench.scenarios import run_scenarios  # noqa: PLC0415

    return run_scenarios(
        args.only,
        quick=args.quick,
        results=Path(args.results),
        processes=args.processes,
        baseline=args.baseline_python,
        open_streams=tuple(args.open_streams or ()),
        open_rate=args.open_rate,
        open_heartbeat=args.open_heartbeat,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Kōrero benchmarks: a ghz-compatible load tool and the performance scenarios. "
        "Without a command, runs every scenario (as `make bench` does).",
    )
    sub = parser.add_subparsers(dest="command")
    _add_run(sub)
    _add_scenarios(sub)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["scenarios"])
    code: int = args.func(args)
    return code

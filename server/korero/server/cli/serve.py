"""`korero serve`: run the gRPC server (one process, or N workers on the same ports)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import uvloop

from korero.server.cli.workers import Supervisor, available_cores, configure_logging
from korero.server.settings import Settings, SettingsError, env_reference

__all__ = ["register"]


def _epilog() -> str:
    rows = env_reference()
    width = max(len(name) for name, _, _ in rows)
    lines = ["environment variables (default in brackets):"]
    lines += [f"  {name:<{width}}  {doc} [{default}]" for name, default, doc in rows]
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `serve` to the `korero` command."""
    parser = subparsers.add_parser(
        "serve",
        help="run the Kōrero gRPC server",
        description="Run the Kōrero gRPC server. Settings come from the environment; "
        "--listen overrides KORERO_LISTEN, --workers KORERO_WORKERS. With more than one "
        "worker, the processes share the gRPC, WebSocket and metrics ports (SO_REUSEPORT).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", help="HOST:PORT to listen on (overrides KORERO_LISTEN)")
    parser.add_argument(
        "--workers",
        type=_count,
        help="server processes sharing the ports (overrides KORERO_WORKERS; "
        "default: one per available core)",
    )
    parser.set_defaults(func=_serve)


def _count(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _serve(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    if args.listen:
        environ["KORERO_LISTEN"] = args.listen
    try:
        settings = Settings.from_env(environ)
    except SettingsError as exc:
        print(f"korero serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.server.log_level)
    workers = args.workers or settings.server.workers or available_cores()
    if workers > 1:
        return Supervisor(settings, workers).run()
    from korero.server.app import run  # noqa: PLC0415 - keep --help fast

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(settings))
    except OSError as exc:
        print(f"korero serve: {exc}", file=sys.stderr)
        return 1
    return 0

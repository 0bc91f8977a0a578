"""`korero serve`: run the gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import uvloop

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
        "--listen overrides KORERO_LISTEN.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", help="HOST:PORT to listen on (overrides KORERO_LISTEN)")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    if args.listen:
        environ["KORERO_LISTEN"] = args.listen
    try:
        settings = Settings.from_env(environ)
    except SettingsError as exc:
        print(f"korero serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    # One line per upstream HTTP request is noise next to our own turn events.
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    from korero.server.app import run  # noqa: PLC0415 - keep --help fast

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(settings))
    except OSError as exc:
        print(f"korero serve: {exc}", file=sys.stderr)
        return 1
    return 0

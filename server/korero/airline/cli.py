"""The ``airline-api`` command: serve the sample airline data until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal

from korero.airline._service import AirlineService

__all__ = ["DEFAULT_PORT", "register"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``airline-api`` subcommand."""
    help_text = "run the sample airline data service (flights and bookings over HTTP)"
    parser = subparsers.add_parser("airline-api", help=help_text, description=help_text)
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"interface (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"TCP port, 0 for any (default {DEFAULT_PORT})",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; return the exit code."""
    return asyncio.run(_serve(args.host, args.port))


async def _serve(host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    service = AirlineService()
    await service.start(host, port)
    try:
        # The line a supervising script waits for; it carries the real port.
        print(f"airline-api listening on {service.base_url}", flush=True)  # noqa: T201
        await stopping.wait()
    finally:
        await service.stop()
    return 0

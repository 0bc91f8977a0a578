"""The ``upstream-sim`` command: run `UpstreamSim` until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal

from korero.sim._upstream import DEFAULT_ANSWER_TOKENS, SimConfig, UpstreamSim

__all__ = ["register"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8088


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``upstream-sim`` subcommand."""
    help_text = "run the simulated OpenAI-compatible upstream"
    parser = subparsers.add_parser("upstream-sim", help=help_text, description=help_text)
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"interface to bind (default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"TCP port to bind, 0 for any free port (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--ttft-ms",
        type=_non_negative_float,
        default=0.0,
        help="milliseconds before the first content token (default 0)",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=_non_negative_float,
        default=0.0,
        help="streaming rate after the first token, 0 for unlimited (default 0)",
    )
    parser.add_argument(
        "--answer-tokens",
        type=_non_negative_int,
        default=DEFAULT_ANSWER_TOKENS,
        help=f"tokens in a full answer (default {DEFAULT_ANSWER_TOKENS})",
    )
    parser.add_argument(
        "--persona",
        choices=("assistant", "echo"),
        default="assistant",
        help="assistant: a short relevant reply per intent (default); echo: the question "
        "echoed plus filler of exactly --answer-tokens tokens (for load tests)",
    )
    parser.add_argument(
        "--no-usage",
        action="store_true",
        help="never report token usage, even when the request asks for it",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; return the exit code."""
    config = SimConfig(
        ttft=args.ttft_ms / 1000.0,
        tokens_per_second=args.tokens_per_second,
        answer_tokens=args.answer_tokens,
        send_usage=not args.no_usage,
        persona=args.persona,
    )
    return asyncio.run(_serve(config, args.host, args.port))


async def _serve(config: SimConfig, host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stopping.set)
    sim = UpstreamSim(config)
    try:
        await sim.start(host, port)
        try:
            # The one line a supervising script waits for; it carries the real port.
            print(f"upstream-sim listening on {sim.base_url}", flush=True)  # noqa: T201
            await stopping.wait()
        finally:
            await sim.stop()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    return 0

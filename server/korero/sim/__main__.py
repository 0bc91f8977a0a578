"""``python -m korero.sim [upstream-sim] [options]``: run the simulated upstream."""

from __future__ import annotations

import argparse
import logging
import sys

from korero.sim.cli import register

COMMAND = "upstream-sim"


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (the subcommand name is optional) and run the command."""
    args_in = sys.argv[1:] if argv is None else argv
    if not args_in or args_in[0] != COMMAND:
        args_in = [COMMAND, *args_in]
    parser = argparse.ArgumentParser(prog="python -m korero.sim")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(args_in)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    exit_code: int = args.func(args)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())

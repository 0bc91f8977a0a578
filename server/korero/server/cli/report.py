"""`korero report`: a tenant's conversations over a period (containment, handoffs, waits)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import asyncpg

from korero.server.report.queries import build_report, parse_since, render
from korero.server.settings import Settings, SettingsError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `report` to the `korero` command."""
    parser = subparsers.add_parser(
        "report",
        help="containment, handoffs by trigger, agent wait, TTFT, cache, top intents",
        description="Read a tenant's turns and handoffs from PostgreSQL "
        "(KORERO_POSTGRES_URL) and print the figures for a period.",
    )
    parser.add_argument("--tenant", help="tenant id (default: KORERO_TENANT)")
    parser.add_argument("--since", default="7d", help="the period up to now, e.g. 24h, 7d [7d]")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    parser.add_argument("--top", type=int, default=5, help="how many intents to list [5]")
    parser.add_argument("--url", help="PostgreSQL URL (default: KORERO_POSTGRES_URL)")
    parser.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(dict(os.environ))
        since = parse_since(args.since)
    except (SettingsError, ValueError) as exc:
        print(f"korero report: {exc}", file=sys.stderr)
        return 2
    url = args.url or settings.postgres.url
    if url is None:
        print("korero report: KORERO_POSTGRES_URL is off; nothing to read", file=sys.stderr)
        return 2
    tenant = args.tenant or settings.engine.tenant

    async def run() -> str:
        conn = await asyncpg.connect(url, timeout=settings.postgres.timeout)
        try:
            report = await build_report(conn, tenant, since, top=args.top)
        finally:
            await conn.close()
        return json.dumps(report.to_json(), indent=2) if args.json else render(report)

    try:
        print(asyncio.run(run()))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        print(f"korero report: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0

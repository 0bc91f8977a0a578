"""`korero db migrate`: create the PostgreSQL database if missing and apply migrations."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import asyncpg

from korero.server.settings import Settings, SettingsError
from korero.server.storage.migrate import ensure_database, migrate

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `db migrate` to the `korero` command."""
    db = subparsers.add_parser(
        "db",
        help="manage the PostgreSQL schema",
        description="PostgreSQL (KORERO_POSTGRES_URL / POSTGRES_URL) holds long-term history.",
    )
    commands = db.add_subparsers(dest="db_command", required=True)
    up = commands.add_parser(
        "migrate",
        help="create the database if missing, then apply pending migrations",
        description="Apply the numbered SQL migrations not yet recorded in korero_migrations, "
        "in order, each in its own transaction. Running it again applies nothing.",
    )
    up.add_argument("--url", help="PostgreSQL URL (default: KORERO_POSTGRES_URL)")
    up.set_defaults(func=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    try:
        url = args.url or Settings.from_env(dict(os.environ)).postgres.url
    except SettingsError as exc:
        print(f"korero db: {exc}", file=sys.stderr)
        return 2
    if url is None:
        print("korero db: KORERO_POSTGRES_URL is off; nothing to migrate", file=sys.stderr)
        return 2
    try:
        created = asyncio.run(ensure_database(url))
        applied = asyncio.run(migrate(url))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        print(f"korero db: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if created:
        print("created the database")
    for migration in applied:
        print(f"applied {migration.version:04d}_{migration.name}")
    if not applied:
        print("schema is up to date")
    return 0

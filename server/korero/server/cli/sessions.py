"""`korero sessions purge`: delete a tenant's sessions idle longer than the retention."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from korero.server.errors import KoreroError
from korero.server.settings import Settings, SettingsError, parse_age
from korero.server.storage.history import HistoryStore
from korero.server.storage.sessions import SessionStore

__all__ = ["register"]

_TOMBSTONE_SECONDS = 86400


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `sessions purge` to the `korero` command."""
    sessions = subparsers.add_parser(
        "sessions", help="manage stored sessions", description="Stored sessions and retention."
    )
    commands = sessions.add_subparsers(dest="sessions_command", required=True)
    purge = commands.add_parser(
        "purge",
        help="delete the tenant's sessions idle longer than a duration",
        description="Delete every session of the tenant not updated for longer than "
        "--older-than (default: KORERO_HISTORY_RETENTION), from PostgreSQL and Redis: "
        "the same deletion as DeleteSession. Run it daily (cron) for retention.",
    )
    purge.add_argument("--tenant", required=True, help="the tenant whose sessions to purge")
    purge.add_argument(
        "--older-than", help="e.g. 90d, 12h, 30m (default: KORERO_HISTORY_RETENTION)"
    )
    purge.add_argument(
        "--dry-run", action="store_true", help="count the sessions without deleting them"
    )
    purge.set_defaults(func=lambda a: asyncio.run(_purge(a)))


async def _purge(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(dict(os.environ))
        age = parse_age(args.older_than) if args.older_than else settings.postgres.history_retention
    except (SettingsError, ValueError) as exc:
        print(f"korero sessions: {exc}", file=sys.stderr)
        return 2
    if age is None:
        print("korero sessions: give --older-than or set KORERO_HISTORY_RETENTION", file=sys.stderr)
        return 2
    if settings.postgres.url is None:
        print("korero sessions: KORERO_POSTGRES_URL is off", file=sys.stderr)
        return 2
    history = await HistoryStore.connect(settings.postgres)
    store = SessionStore.connect(settings.redis, settings.engine, outbox=True)
    deleted = 0
    try:
        while True:
            stale = await history.stale_sessions(args.tenant, age)
            if args.dry_run:
                print(f"{len(stale)} sessions of {args.tenant} idle longer than {age}s")
                return 0
            for session_id in stale:
                # Redis first: a session deleted there cannot be written back to PostgreSQL.
                await store.delete_session(args.tenant, session_id)
                await history.delete_session(args.tenant, session_id)
                deleted += 1
            if not stale:
                break
        # Deletions older than a day cannot be undone by a late write any more.
        await history.prune_tombstones(_TOMBSTONE_SECONDS)
    except KoreroError as exc:
        print(f"korero sessions: {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await history.close()
        await store.close()
    print(f"deleted {deleted} sessions of {args.tenant} idle longer than {age}s")
    return 0

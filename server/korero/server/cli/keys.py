"""`korero keys`: create, list and revoke API keys (stored hashed in Redis)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import sys

import redis.exceptions as rexc

from korero.server.policy.api_keys import ApiKeyStore, valid_tenant
from korero.server.settings import RedisSettings, Settings, SettingsError
from korero.server.storage.connection import connect

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `keys` to the `korero` command."""
    parser = subparsers.add_parser(
        "keys",
        help="manage API keys (create, list, revoke)",
        description="Manage API keys in the Redis at REDIS_URL. A key is shown once, "
        "when created; Redis keeps only its SHA-256.",
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--tenant", required=True, help="tenant the key acts for")
    create.add_argument("--name", default="", help="a label to recognise the key by")
    create.add_argument(
        "--scope",
        action="append",
        default=[],
        help="limit the key to a scope (chat:write, chat:read); repeatable; none = all",
    )
    listing = sub.add_parser("list", help="list a tenant's keys (never the secrets)")
    listing.add_argument("--tenant", required=True, help="tenant whose keys to list")
    revoke = sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("--tenant", required=True, help="tenant owning the key")
    revoke.add_argument("key_id", help="the id shown by `korero keys list`")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"korero keys: {exc}", file=sys.stderr)
        return 2
    if not valid_tenant(args.tenant):
        print(
            "korero keys: --tenant must be 1-63 characters of a-z 0-9 -, starting alphanumeric",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(_act(args, settings.redis))
    except (rexc.RedisError, OSError) as exc:
        print(f"korero keys: Redis at {settings.redis.url} failed: {exc}", file=sys.stderr)
        return 1


async def _act(args: argparse.Namespace, redis_settings: RedisSettings) -> int:
    client = connect(dataclasses.replace(redis_settings, timeout=5.0))
    try:
        store = ApiKeyStore(client)
        if args.keys_command == "create":
            key, record = await store.create(args.tenant, args.name, tuple(args.scope))
            print(key)
            scopes = ",".join(record.scopes) or "all"
            print(
                f"key id {record.key_id} for tenant {record.tenant} (scopes: {scopes}); "
                "store it now, it is not shown again",
                file=sys.stderr,
            )
            return 0
        if args.keys_command == "list":
            records = await store.list(args.tenant)
            print(f"{'KEY ID':<14}{'CREATED (UTC)':<22}{'STATUS':<10}{'SCOPES':<24}NAME")
            for r in records:
                created = dt.datetime.fromtimestamp(r.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M")
                status = "revoked" if r.revoked_at else "active"
                scopes = ",".join(r.scopes) or "all"
                print(f"{r.key_id:<14}{created:<22}{status:<10}{scopes:<24}{r.name}")
            return 0
        if await store.revoke(args.tenant, args.key_id):
            print(f"revoked {args.key_id}")
            return 0
        print(f"korero keys: no active key {args.key_id} for tenant {args.tenant}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()

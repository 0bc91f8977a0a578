"""`korero webhooks`: the CRM / ticketing webhook outbox (list, retry dead letters)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import redis.asyncio as aioredis

from korero.server.errors import KoreroError
from korero.server.handoff.webhooks import dead_letters, pending, retry_dead_letters
from korero.server.settings import Settings, SettingsError
from korero.server.storage.connection import connect

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `webhooks list` and `webhooks retry` to the `korero` command."""
    parser = subparsers.add_parser(
        "webhooks",
        help="inspect and retry handoff webhooks",
        description="The webhook outbox in Redis (REDIS_URL) for the endpoints in KORERO_WEBHOOKS.",
    )
    commands = parser.add_subparsers(dest="webhooks_command", required=True)
    listing = commands.add_parser(
        "list", help="endpoints, deliveries waiting, and dead letters (after the last attempt)"
    )
    retry = commands.add_parser(
        "retry", help="put dead letters back in their endpoint's queue (all, or one by event id)"
    )
    retry.add_argument("event_id", nargs="?", default="", help="an event id (evt_…); none: all")
    for sub in (listing, retry):
        sub.add_argument("--tenant", help="tenant id (default: every tenant with endpoints)")
    listing.set_defaults(func=lambda a: _run(_list(a)))
    retry.set_defaults(func=lambda a: _run(_retry(a)))


def _run(coro: Any) -> int:
    try:
        return int(asyncio.run(coro))
    except (SettingsError, OSError, KoreroError) as exc:
        print(f"korero webhooks: {exc}", file=sys.stderr)
        return 1


def _connect() -> tuple[Settings, aioredis.Redis]:
    settings = Settings.from_env(dict(os.environ))
    client = connect(settings.redis, socket_timeout=max(settings.redis.timeout, 10.0))
    return settings, client


async def _list(args: argparse.Namespace) -> int:
    settings, client = _connect()
    try:
        targets = settings.webhooks.targets
        if not targets:
            print("no webhook endpoints configured (KORERO_WEBHOOKS)")
            return 0
        print(f"{'tenant':<16}{'endpoint':<14}{'waiting':>8}  url")
        for tenant, endpoints in targets.items():
            if args.tenant and tenant != args.tenant:
                continue
            for target in endpoints:
                waiting = await pending(client, tenant, target)
                print(f"{tenant:<16}{target.target_id:<14}{waiting:>8}  {target.url}")
        dead = await dead_letters(client, settings.webhooks, args.tenant)
        print(f"\ndead letters: {len(dead)}")
        for letter in dead:
            print(
                f"  {letter.event_id}  {letter.event_type:<22} {letter.tenant:<12} "
                f"attempts={letter.attempts}  last error: {letter.last_error}"
            )
    finally:
        await client.aclose()
    return 0


async def _retry(args: argparse.Namespace) -> int:
    settings, client = _connect()
    try:
        tenants = [args.tenant] if args.tenant else list(settings.webhooks.targets)
        moved = 0
        for tenant in tenants:
            moved += await retry_dead_letters(client, settings.webhooks, tenant, args.event_id)
    finally:
        await client.aclose()
    print(f"{moved} dead letter{'s' if moved != 1 else ''} queued again")
    return 0 if moved or not args.event_id else 1

"""`korero tools`: add, list and remove a tenant's tools (stored in Redis)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import redis.exceptions as rexc

from korero.server.errors import KoreroError
from korero.server.policy.api_keys import valid_tenant
from korero.server.settings import RedisSettings, Settings, SettingsError
from korero.server.storage.connection import connect
from korero.server.tools import ToolRegistry, ToolSpec, ToolSpecError

__all__ = ["load_tool_file", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tools` to the `korero` command."""
    parser = subparsers.add_parser(
        "tools",
        help="manage a tenant's tools (add, list, remove)",
        description="Manage the tools (live-data HTTP endpoints the model may call) of a "
        "tenant, in the Redis at REDIS_URL. See docs/tools.md for the JSON form.",
    )
    sub = parser.add_subparsers(dest="tools_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="add or replace tools from a JSON file or argument")
    add.add_argument("--tenant", required=True, help="tenant the tools belong to")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="a JSON file: one tool object or a list")
    source.add_argument("--json", help="one tool object (or a list) as JSON text")
    add.add_argument(
        "--endpoint-base",
        default="",
        help="replace the scheme://host:port of every endpoint (e.g. http://127.0.0.1:8090)",
    )
    listing = sub.add_parser("list", help="list a tenant's tools")
    listing.add_argument("--tenant", required=True, help="tenant whose tools to list")
    listing.add_argument("--json", action="store_true", help="print the full JSON form")
    remove = sub.add_parser("remove", help="remove a tool by name")
    remove.add_argument("--tenant", required=True, help="tenant owning the tool")
    remove.add_argument("name", help="the tool's name")
    parser.set_defaults(func=_run)


def _rebase(endpoint: str, base: str) -> str:
    scheme_end = endpoint.index("://") + 3
    path_start = endpoint.find("/", scheme_end)
    return base.rstrip("/") + (endpoint[path_start:] if path_start >= 0 else "")


def load_tool_file(text: str, endpoint_base: str = "") -> list[ToolSpec]:
    """Parse one tool object or a list of them; raise ToolSpecError/ValueError when unusable."""
    data: Any = json.loads(text)
    items = data if isinstance(data, list) else [data]
    specs = []
    for item in items:
        if not isinstance(item, dict):
            raise ToolSpecError("each tool must be a JSON object")
        fields = dict(item)
        if endpoint_base and isinstance(fields.get("endpoint"), str):
            fields["endpoint"] = _rebase(fields["endpoint"], endpoint_base)
        specs.append(ToolSpec.from_dict(fields))
    return specs


def _run(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"korero tools: {exc}", file=sys.stderr)
        return 2
    if not valid_tenant(args.tenant):
        print(
            "korero tools: --tenant must be 1-63 characters of a-z 0-9 -, starting alphanumeric",
            file=sys.stderr,
        )
        return 2
    specs: list[ToolSpec] = []
    if args.tools_command == "add":
        try:
            text = args.file.read_text() if args.file else args.json
            specs = load_tool_file(text, args.endpoint_base)
        except (OSError, ValueError) as exc:
            print(f"korero tools: {exc}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(_act(args, settings.redis, specs))
    except (rexc.RedisError, OSError, KoreroError) as exc:
        print(f"korero tools: Redis at {settings.redis.url} failed: {exc}", file=sys.stderr)
        return 1


async def _act(
    args: argparse.Namespace, redis_settings: RedisSettings, specs: list[ToolSpec]
) -> int:
    client = connect(dataclasses.replace(redis_settings, timeout=5.0))
    try:
        registry = ToolRegistry(client)
        if args.tools_command == "add":
            for spec in specs:
                added = await registry.put(args.tenant, spec)
                print(f"{'added' if added else 'replaced'} {spec.name} for tenant {args.tenant}")
            return 0
        if args.tools_command == "list":
            tools = await registry.list(args.tenant)
            if args.json:
                print(json.dumps([t.to_dict() for t in tools], indent=2))
                return 0
            print(f"{'NAME':<24}{'INTENTS':<20}{'PERSONAL':<10}{'TIMEOUT':<9}ENDPOINT")
            for t in tools:
                personal = "yes" if t.personal else "no"
                intents = ",".join(t.intents)
                print(f"{t.name:<24}{intents:<20}{personal:<10}{t.timeout:<9g}{t.endpoint}")
            return 0
        if await registry.remove(args.tenant, args.name):
            print(f"removed {args.name} from tenant {args.tenant}")
            return 0
        print(f"korero tools: tenant {args.tenant} has no tool {args.name}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()

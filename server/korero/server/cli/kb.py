"""`korero kb`: ingest a knowledge base into Redis, and try retrieval against it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import redis.asyncio as aioredis

from korero.server.context.knowledge import KnowledgeBase, KnowledgeStore, load_documents
from korero.server.errors import KoreroError
from korero.server.settings import Settings, SettingsError
from korero.server.storage.connection import connect

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `kb ingest` and `kb search` to the `korero` command."""
    kb = subparsers.add_parser(
        "kb",
        help="manage a tenant's knowledge base",
        description="Knowledge base in Redis (REDIS_URL): ingest documents, try retrieval.",
    )
    commands = kb.add_subparsers(dest="kb_command", required=True)
    ingest = commands.add_parser(
        "ingest",
        help="ingest Markdown/JSON documents as the tenant's new KB version",
        description="Parse every *.md and *.json under DIR, chunk by section and store the "
        "chunks as the tenant's new knowledge-base version (cached answers of the old version "
        "are deleted).",
    )
    ingest.add_argument("directory", metavar="DIR", type=Path)
    search = commands.add_parser("search", help="show the top chunks for a question")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=3, help="how many chunks (default 3)")
    for parser in (ingest, search):
        parser.add_argument(
            "--tenant", help="tenant id (default: KORERO_TENANT, i.e. the server's tenant)"
        )
    ingest.set_defaults(func=lambda a: _run(_ingest(a)))
    search.set_defaults(func=lambda a: _run(_search(a)))


def _run(coro: object) -> int:
    try:
        return int(asyncio.run(coro))  # type: ignore[arg-type]
    except (SettingsError, ValueError, OSError, KoreroError) as exc:
        print(f"korero kb: {exc}", file=sys.stderr)
        return 1


def _connect() -> tuple[Settings, aioredis.Redis]:
    settings = Settings.from_env(dict(os.environ))
    client = connect(settings.redis, socket_timeout=max(settings.redis.timeout, 10.0))
    return settings, client


async def _ingest(args: argparse.Namespace) -> int:
    documents = load_documents(args.directory)
    if not documents:
        raise ValueError(f"no *.md or *.json documents under {args.directory}")
    settings, client = _connect()
    tenant = args.tenant or settings.engine.tenant
    try:
        version = await KnowledgeStore(client).ingest(tenant, documents)
    finally:
        await client.aclose()
    chunks = sum(len(d.chunks) for d in documents)
    print(
        f"ingested {len(documents)} documents, {chunks} chunks for tenant {tenant}: "
        f"kb version {version}"
    )
    return 0


async def _search(args: argparse.Namespace) -> int:
    settings, client = _connect()
    tenant = args.tenant or settings.engine.tenant
    try:
        store = KnowledgeStore(client)
        version = await store.version(tenant)
        if version == 0:
            raise ValueError(f"tenant {tenant} has no knowledge base; run `korero kb ingest`")
        sources = await KnowledgeBase(store, settings.knowledge).search(
            tenant, version, args.query, args.k
        )
    finally:
        await client.aclose()
    for source in sources:
        relevant = "" if source.score >= settings.knowledge.min_score else "  (below threshold)"
        print(f"{source.score:.3f}  {source.label} {source.chunk.heading}{relevant}")
    return 0

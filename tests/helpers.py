"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from korero.chat.v1 import chat_pb2 as pb
from korero.client import Conversation
from korero.server.context.knowledge import KnowledgeStore, load_documents
from korero.server.settings import RedisSettings
from korero.server.storage.connection import connect


async def run_turn(
    conversation: Conversation, text: str, cmid: str | None = None
) -> list[pb.Event]:
    """All events of one turn, terminal last."""
    return [event async for event in conversation.send(text, cmid)]


def kinds(events: list[pb.Event]) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in events]


def text_of(events: list[pb.Event]) -> str:
    return "".join(e.text_delta.text for e in events if e.WhichOneof("kind") == "text_delta")


def terminals(events: list[pb.Event]) -> list[pb.Event]:
    return [e for e in events if e.WhichOneof("kind") in ("done", "error")]


SAMPLE_KB = Path(__file__).resolve().parent.parent / "kb" / "sample"


def redis_client(redis_url: str) -> aioredis.Redis:
    """An asyncio client for `redis_url`: one server or a `redis+cluster://` cluster."""
    return connect(RedisSettings(url=redis_url, timeout=5.0))


async def ingest_sample(redis_url: str, tenant: str = "default") -> int:
    """Ingest the sample knowledge base for `tenant`; returns the KB version."""
    client = redis_client(redis_url)
    try:
        return await KnowledgeStore(client).ingest(tenant, load_documents(SAMPLE_KB))
    finally:
        await client.aclose()


def of_kind(events: list[pb.Event], kind: str) -> list[pb.Event]:
    return [e for e in events if e.WhichOneof("kind") == kind]

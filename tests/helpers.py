"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from korero.chat.v1 import chat_pb2 as pb
from korero.client import Conversation
from korero.server.context.knowledge import KnowledgeStore, load_documents


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


async def ingest_sample(redis_url: str, tenant: str = "default") -> int:
    """Ingest the sample knowledge base for `tenant`; returns the KB version."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return await KnowledgeStore(client).ingest(tenant, load_documents(SAMPLE_KB))
    finally:
        await client.aclose()


def of_kind(events: list[pb.Event], kind: str) -> list[pb.Event]:
    return [e for e in events if e.WhichOneof("kind") == kind]

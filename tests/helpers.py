"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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


class RawChat:
    """A `Chat` stream on the generated stub, for frames the client would never send."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.session_id = ""

    @classmethod
    async def open(cls, stub: Any) -> RawChat:
        chat = cls(stub.Chat())
        await chat.call.write(pb.ChatRequest(start=pb.StartSession()))
        chat.session_id = (await chat.next_event()).session_id
        return chat

    async def write(self, request: pb.ChatRequest) -> None:
        await self.call.write(request)

    async def next_event(self, timeout: float = 5.0) -> pb.Event:
        """The next event that is not a heartbeat."""
        while True:
            response = await asyncio.wait_for(self.call.read(), timeout)
            if response.event.WhichOneof("kind") != "heartbeat":
                return response.event  # type: ignore[no-any-return]

    async def turn(self, text: str, cmid: str) -> list[pb.Event]:
        """Send a message and collect events up to its turn's terminal one."""
        await self.write(pb.ChatRequest(message=pb.UserMessage(client_message_id=cmid, text=text)))
        events = []
        while True:
            event = await self.next_event()
            events.append(event)
            if event.WhichOneof("kind") in ("done", "error") and event.turn_id:
                return events

    def close(self) -> None:
        self.call.cancel()

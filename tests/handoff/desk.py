"""A test agent: an AgentDeskService `Connect` stream with helpers to wait for events."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from typing import Any

import grpc

from korero.agent.v1 import agent_pb2 as apb
from korero.agent.v1 import agent_pb2_grpc
from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, Conversation
from tests.helpers import run_turn


class Agent:
    """One agent desk stream on `target`."""

    def __init__(
        self,
        target: str,
        agent_id: str,
        name: str,
        *,
        skills: Sequence[str] = (),
        max_conversations: int = 1,
        metadata: Sequence[tuple[str, str]] = (),
        away: bool = False,
    ) -> None:
        self.target = target
        self.agent_id = agent_id
        self.name = name
        self._skills = tuple(skills)
        self._max = max_conversations
        self._metadata = tuple(metadata)
        self._away = away
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = agent_pb2_grpc.AgentDeskServiceStub(self.channel)
        self.events: list[apb.DeskEvent] = []
        self._taken: set[int] = set()
        self._changed = asyncio.Condition()
        self.call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.error: grpc.aio.AioRpcError | None = None

    async def connect(self) -> apb.DeskEvent:
        self.call = self.stub.Connect(metadata=self._metadata)
        await self.call.write(
            apb.ConnectRequest(
                join=apb.JoinDesk(
                    agent_id=self.agent_id,
                    display_name=self.name,
                    skills=self._skills,
                    max_conversations=self._max,
                    availability=apb.AVAILABILITY_AWAY
                    if self._away
                    else apb.AVAILABILITY_AVAILABLE,
                )
            )
        )
        self._reader = asyncio.create_task(self._read())
        return await self.expect("joined")

    async def _read(self) -> None:
        try:
            async for response in self.call:
                async with self._changed:
                    self.events.append(response.event)
                    self._changed.notify_all()
        except grpc.aio.AioRpcError as error:
            self.error = error
        except asyncio.CancelledError:
            pass
        async with self._changed:
            self._changed.notify_all()

    async def expect(self, kind: str, timeout: float = 10.0, **match: Any) -> apb.DeskEvent:
        """The next event of `kind` not yet returned (and matching `field=value`)."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for i, event in enumerate(self.events):
                    if i in self._taken or event.WhichOneof("kind") != kind:
                        continue
                    body = getattr(event, kind)
                    if all(getattr(body, k) == v for k, v in match.items()):
                        self._taken.add(i)
                        return event
                if self.error is not None:
                    raise AssertionError(f"desk stream ended: {self.error}")
                await self._changed.wait()

    def of_kind(self, kind: str) -> list[Any]:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("kind") == kind]

    async def send(self, request: apb.ConnectRequest) -> None:
        await self.call.write(request)

    async def accept(self, handoff_id: str) -> None:
        await self.send(apb.ConnectRequest(accept=apb.AcceptConversation(handoff_id=handoff_id)))

    async def decline(self, handoff_id: str) -> None:
        await self.send(apb.ConnectRequest(decline=apb.DeclineConversation(handoff_id=handoff_id)))

    async def say(self, handoff_id: str, text: str, message_id: str | None = None) -> None:
        await self.send(
            apb.ConnectRequest(
                message=apb.SendAgentMessage(
                    handoff_id=handoff_id, message_id=message_id or uuid.uuid4().hex, text=text
                )
            )
        )

    async def release(self, handoff_id: str, *, close: bool = False, disposition: str = "") -> None:
        await self.send(
            apb.ConnectRequest(
                release=apb.ReleaseConversation(
                    handoff_id=handoff_id,
                    mode=apb.RELEASE_MODE_CLOSE if close else apb.RELEASE_MODE_RETURN_TO_BOT,
                    disposition=disposition,
                )
            )
        )

    async def pick(self, session_id: str, reason: str = "") -> None:
        await self.send(
            apb.ConnectRequest(pick=apb.PickConversation(session_id=session_id, reason=reason))
        )

    async def drop(self) -> None:
        """Vanish without saying goodbye (the connection is cut)."""
        if self.call is not None:
            self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()
        await self.channel.close(grace=None)

    async def close(self) -> None:
        if self.call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self.call.done_writing()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 3)
            except TimeoutError:
                self._reader.cancel()
        await self.channel.close(grace=None)


async def notification(conversation: Conversation, kind: str, timeout: float = 10.0) -> pb.Event:
    """The customer's next notification of `kind` (others are skipped)."""
    while True:
        event = await conversation.next_notification(timeout)
        if event.WhichOneof("kind") == kind:
            return event


async def handed_over(client: ChatClient, agent: Agent) -> tuple[Conversation, str]:
    """A new conversation that asks for a person, accepted by `agent`: (it, handoff id)."""
    conversation = await client.conversation()
    await run_turn(conversation, "I want to talk to a real person")
    handoff_id = (await agent.expect("offered")).offered.context.handoff_id
    await agent.accept(handoff_id)
    await agent.expect("assigned")
    return conversation, handoff_id

"""An async client for `korero.agent.v1.AgentDeskService`: one agent's desk."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from korero.agent.v1 import agent_pb2 as apb
from korero.agent.v1 import agent_pb2_grpc
from korero.client._errors import ChatError

__all__ = ["AgentDesk"]

_CLOSED = object()


class AgentDesk:
    """A `Connect` stream: sign in, then act and read desk events.

    async with AgentDesk("127.0.0.1:50051", agent_id="mere", display_name="Mere") as desk:
        async for event in desk.events():
            ...
    """

    def __init__(
        self,
        target: str,
        *,
        agent_id: str = "",
        display_name: str = "",
        skills: Sequence[str] = (),
        max_conversations: int = 1,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = agent_pb2_grpc.AgentDeskServiceStub(self._channel)
        self._join = apb.JoinDesk(
            agent_id=agent_id,
            display_name=display_name,
            skills=list(skills),
            max_conversations=max_conversations,
            availability=apb.AVAILABILITY_AVAILABLE,
        )
        self._metadata = tuple(metadata)
        self._call: Any = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self.error: ChatError | None = None
        self.joined: apb.DeskJoined | None = None

    async def __aenter__(self) -> AgentDesk:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> apb.DeskJoined:
        """Sign in; returns the desk's confirmation."""
        self._call = self._stub.Connect(metadata=self._metadata)
        try:
            await self._call.write(apb.ConnectRequest(join=self._join))
            first = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise ChatError.from_rpc_error(error) from None
        if first is grpc.aio.EOF or first.event.WhichOneof("kind") != "joined":
            raise ChatError(grpc.StatusCode.UNAVAILABLE, "the desk closed before joining")
        self.joined = first.event.joined
        self._reader = asyncio.create_task(self._read())
        return self.joined

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    break
                if response.event.WhichOneof("kind") != "heartbeat":
                    self._queue.put_nowait(response.event)
        except grpc.aio.AioRpcError as error:
            self.error = ChatError.from_rpc_error(error)
        except asyncio.CancelledError:
            pass
        self._queue.put_nowait(_CLOSED)

    async def events(self) -> AsyncIterator[apb.DeskEvent]:
        """Desk events until the stream ends (heartbeats skipped)."""
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                self._queue.put_nowait(_CLOSED)
                if self.error is not None:
                    raise self.error
                return
            yield item

    async def _send(self, **kind: Any) -> None:
        try:
            await self._call.write(apb.ConnectRequest(**kind))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            raise ChatError(
                grpc.StatusCode.UNAVAILABLE, f"the desk stream ended ({error})"
            ) from None

    async def accept(self, handoff_id: str) -> None:
        await self._send(accept=apb.AcceptConversation(handoff_id=handoff_id))

    async def decline(self, handoff_id: str) -> None:
        await self._send(decline=apb.DeclineConversation(handoff_id=handoff_id))

    async def pick(self, session_id: str, reason: str = "") -> None:
        await self._send(pick=apb.PickConversation(session_id=session_id, reason=reason))

    async def say(self, handoff_id: str, text: str, message_id: str = "") -> None:
        await self._send(
            message=apb.SendAgentMessage(
                handoff_id=handoff_id, message_id=message_id or uuid.uuid4().hex, text=text
            )
        )

    async def release(
        self, handoff_id: str, *, close: bool = False, disposition: str = "", note: str = ""
    ) -> None:
        await self._send(
            release=apb.ReleaseConversation(
                handoff_id=handoff_id,
                mode=apb.RELEASE_MODE_CLOSE if close else apb.RELEASE_MODE_RETURN_TO_BOT,
                disposition=disposition,
                note=note,
            )
        )

    async def set_available(self, available: bool) -> None:
        await self._send(
            availability=apb.SetAvailability(
                availability=apb.AVAILABILITY_AVAILABLE if available else apb.AVAILABILITY_AWAY
            )
        )

    async def close(self) -> None:
        if self._call is not None:
            try:
                await self._call.done_writing()
                if self._reader is not None:
                    await asyncio.wait_for(self._reader, 3.0)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
                self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()

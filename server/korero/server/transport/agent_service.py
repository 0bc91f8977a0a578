"""The gRPC transport of the agent desk: `korero.agent.v1.AgentDeskService`.

As thin as `ChatService`: the first frame must be `join`; frames in become
`AgentDesk` calls, desk events out become frames. The call gate has already
checked the credential (a method of `korero.agent.v1` needs `agent:write`,
`ListQueue` `agent:read`), so the tenant and the agent's identity come from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from korero.agent.v1 import agent_pb2 as apb
from korero.agent.v1 import agent_pb2_grpc
from korero.server.errors import InvalidArgumentError, KoreroError
from korero.server.handoff.desk import AgentDesk, queued_entry
from korero.server.handoff.service import HandoffService
from korero.server.policy.identity import Identity
from korero.server.telemetry import Metrics
from korero.server.transport.interceptors import current_identity
from korero.server.transport.lifecycle import Lifecycle
from korero.server.transport.status import abort_with_error

__all__ = ["AgentDeskServicer", "agent_subject", "read_join"]


def agent_subject(identity: Identity | None) -> str | None:
    """The agent id a credential names (None: anonymous, the join frame names it)."""
    if identity is None or identity.subject == "anonymous":
        return None
    return identity.subject


async def read_join(receive: Any, within: float) -> apb.JoinDesk:
    """The first frame of a desk stream, which must be `join`."""
    try:
        async with asyncio.timeout(within):
            first = await receive()
    except TimeoutError:
        raise KoreroError(
            grpc.StatusCode.DEADLINE_EXCEEDED, "FIRST_FRAME_TIMEOUT", f"no join within {within:g}s"
        ) from None
    if first is None or first.WhichOneof("kind") != "join":
        raise InvalidArgumentError(
            "FIRST_FRAME_NOT_JOIN", "the first frame of a desk stream must be `join`"
        )
    join: apb.JoinDesk = first.join
    return join


class AgentDeskServicer(agent_pb2_grpc.AgentDeskServiceServicer):
    """AgentDeskService on the handoff service."""

    def __init__(
        self,
        *,
        service: HandoffService,
        lifecycle: Lifecycle,
        metrics: Metrics,
        heartbeat_interval: float,
        first_frame_timeout: float,
        default_tenant: str,
    ) -> None:
        self._service = service
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._heartbeat = heartbeat_interval
        self._first_frame = first_frame_timeout
        self._default_tenant = default_tenant

    def _caller(self) -> tuple[str, str | None]:
        identity = current_identity()
        tenant = identity.tenant if identity is not None else self._default_tenant
        return tenant, agent_subject(identity)

    async def Connect(  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[apb.ConnectRequest],
        context: grpc.aio.ServicerContext[apb.ConnectRequest, apb.ConnectResponse],
    ) -> AsyncIterator[apb.ConnectResponse]:
        tenant, subject = self._caller()
        desk = AgentDesk(self._service, tenant, subject, self._heartbeat)
        try:
            join = await read_join(lambda: anext(request_iterator, None), self._first_frame)
            self._lifecycle.check_open()
            await desk.open(join)
        except KoreroError as error:
            await desk.close()
            await abort_with_error(context, error)
        self._metrics.agent_desks.inc()
        reader = asyncio.create_task(self._read(request_iterator, desk))
        try:
            async for event in desk.outbound():
                yield apb.ConnectResponse(event=event)
        finally:
            reader.cancel()
            self._metrics.agent_desks.dec()
            await desk.close()

    @staticmethod
    async def _read(requests: AsyncIterator[apb.ConnectRequest], desk: AgentDesk) -> None:
        try:
            async for request in requests:
                await desk.handle(request)
        except (grpc.aio.AioRpcError, grpc.aio.AbortError, grpc.aio.UsageError):
            pass
        desk.end()

    async def ListQueue(  # noqa: N802 - the gRPC method name
        self,
        request: apb.ListQueueRequest,
        context: grpc.aio.ServicerContext[apb.ListQueueRequest, apb.ListQueueResponse],
    ) -> apb.ListQueueResponse:
        tenant, _ = self._caller()
        try:
            snapshot = await self._service.store.snapshot(tenant)
        except KoreroError as error:
            await abort_with_error(context, error)
        return apb.ListQueueResponse(
            conversations=[
                queued_entry(snapshot, h) for h in snapshot.queued(request.queue or None)
            ]
        )

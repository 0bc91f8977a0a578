"""The agent desk over WebSocket (`/ws/agent`): the agent page's route through Envoy.

Browsers cannot open a gRPC bidirectional stream, so the agent page talks to
the desk the way the chat page talks to a session (see websocket.py): every
WebSocket message is one whole protobuf message, client to server a
`korero.agent.v1.ConnectRequest`, server to client a
`korero.agent.v1.ConnectResponse`, binary (`korero.agent.v1+proto`) or
canonical JSON in text frames (`korero.agent.v1+json`). Credentials go
through the same call gate as the gRPC `Connect` method (an `Authorization`
header, a `korero.bearer.<base64url token>` subprotocol, or a text frame
`{"authorization": "Bearer …"}` before `join`), failed keys counting against
the client's address; the first frame must be `join`. A refusal is said
in-band (a `DeskError` with the gate's code and reason), then the socket
closes with the chat route's close code (`websocket.close_code_for`) and
reason `<CODE_NAME> <REASON>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Final

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from korero.agent.v1 import agent_pb2 as apb
from korero.server.errors import KoreroError
from korero.server.handoff.desk import AgentDesk
from korero.server.handoff.service import HandoffService
from korero.server.policy.gate import CallGate
from korero.server.transport.agent_service import agent_subject, read_join

__all__ = ["AGENT_PATH", "AgentSocket"]

log = logging.getLogger(__name__)

AGENT_PATH: Final = "/ws/agent"
AGENT_METHOD: Final = "/korero.agent.v1.AgentDeskService/Connect"
PROTO_PROTOCOL: Final = "korero.agent.v1+proto"
JSON_PROTOCOL: Final = "korero.agent.v1+json"
PROTOCOLS: Final = (PROTO_PROTOCOL, JSON_PROTOCOL)


class _FrameError(Exception):
    pass


class AgentSocket:
    """One `/ws/agent` socket: gate, `join`, then desk frames both ways."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        *,
        service: HandoffService,
        gate: CallGate,
        authorization: str | None,
        heartbeat_interval: float,
        first_frame_timeout: float,
        close_code: Callable[[KoreroError], int],
        peer: str | None = None,
    ) -> None:
        self._ws = ws
        self._close_code = close_code
        self._peer = peer
        self._service = service
        self._gate = gate
        self._authorization = authorization
        self._heartbeat = heartbeat_interval
        self._first_frame = first_frame_timeout
        self._json = ws.ws_protocol == JSON_PROTOCOL

    def _decode(self, msg: WSMessage) -> apb.ConnectRequest:
        try:
            if self._json and msg.type == WSMsgType.TEXT:
                return json_format.Parse(str(msg.data), apb.ConnectRequest())
            if not self._json and msg.type == WSMsgType.BINARY:
                return apb.ConnectRequest.FromString(bytes(msg.data))
        except (json_format.ParseError, DecodeError):
            pass
        raise _FrameError("FRAME_INVALID not a ConnectRequest")

    async def _send(self, event: apb.DeskEvent) -> None:
        response = apb.ConnectResponse(event=event)
        if self._json:
            await self._ws.send_str(json_format.MessageToJson(response, indent=None))
        else:
            await self._ws.send_bytes(response.SerializeToString())

    async def _receive(self) -> WSMessage | None:
        msg = await self._ws.receive()
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return None
        return msg

    async def _next_request(self) -> apb.ConnectRequest | None:
        msg = await self._receive()
        if msg is not None and msg.type == WSMsgType.TEXT:
            with contextlib.suppress(ValueError):
                data = json.loads(str(msg.data))
                if isinstance(data, dict) and set(data) == {"authorization"}:
                    self._authorization = str(data["authorization"])
                    msg = await self._receive()
        return None if msg is None else self._decode(msg)

    async def run(self) -> None:
        desk: AgentDesk | None = None
        try:
            join = await read_join(self._next_request, self._first_frame)
            # `peer`: failed keys count against this address, as on /ws/chat and gRPC.
            identity = await self._gate.admit(AGENT_METHOD, self._authorization, peer=self._peer)
            desk = AgentDesk(
                self._service, identity.tenant, agent_subject(identity), self._heartbeat
            )
            await desk.open(join)
        except _FrameError as exc:
            await self._ws.close(code=int(WSCloseCode.INVALID_TEXT), message=str(exc).encode())
            return
        except KoreroError as error:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._send(
                    apb.DeskEvent(
                        error=apb.DeskError(
                            code=error.code.value[0], reason=error.reason, message=error.message
                        )
                    )
                )
            await self._ws.close(
                code=self._close_code(error),
                message=f"{error.code.name} {error.reason}".encode()[:123],
            )
            if desk is not None:
                await desk.close()
            return
        reader = asyncio.create_task(self._read(desk))
        try:
            async for event in desk.outbound():
                await self._send(event)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            reader.cancel()
            await desk.close()

    async def _read(self, desk: AgentDesk) -> None:
        try:
            while (request := await self._next_request()) is not None:
                await desk.handle(request)
        except _FrameError as exc:
            await self._ws.close(code=int(WSCloseCode.INVALID_TEXT), message=str(exc).encode())
        desk.end()

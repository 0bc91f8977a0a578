"""The WebSocket transport: one session per socket, over the conversation engine.

(Longer than 400 lines: about a third is this description of the protocol a
browser client is written against; the rest is the handshake, the frame codec
for both subprotocols and the close-code mapping.)

Browsers cannot open a gRPC bidirectional stream, so Envoy routes `/ws/`
here (`/ws/chat` for customers; `/ws/agent`, the agent desk, is in
agent_socket.py). The adapter is as thin as the gRPC servicer: frames in become engine
calls, engine events out become frames. It mirrors `ChatService.Chat`:

* Framing. Every WebSocket message is one whole protobuf message: client to
  server a `korero.chat.v1.ChatRequest`, server to client a
  `korero.chat.v1.ChatResponse` (no length prefix; the WebSocket message is
  the frame). Subprotocol `korero.chat.v1+proto` (or none) uses binary
  messages with the protobuf encoding; `korero.chat.v1+json` uses text
  messages with protobuf's canonical JSON mapping.
* The first request must be `start`; then `message` and `cancel`, exactly as
  on a Chat stream. Errors inside a turn are `error` events; the socket stays.
* Credentials go through the same `CallGate` as gRPC, as the
  `authorization` value: from an `Authorization` header (non-browser
  clients), from a `korero.bearer.<base64url token>` subprotocol (browsers
  cannot set headers), or from a text frame `{"authorization": "Bearer …"}`
  sent before `start`.
* Errors that end the socket — frames it cannot read too — are sent in-band
  first (an `error` event with the canonical code, reason and retryable
  flag), then the socket closes with a code and a reason
  `<CODE_NAME> <REASON>`; see `close_code_for`. A reader that fails for any
  other reason ends the socket the same way (INTERNAL, 1011).
* Events wait for a client that reads slowly in a bounded queue (see
  `outbound.py`); a client that stops reading altogether has its socket
  closed with 1013 `RESOURCE_EXHAUSTED STREAM_QUEUE_FULL`, behind the events
  already queued — or cut, if it does not read them within `_ABANDON_WAIT`.
* Closing the socket (or losing it) cancels the turn in flight, which closes
  the upstream LLM request. On SIGTERM, new sockets are refused, turns in
  flight finish (or end when the grace period does), then sockets close
  with 1012 (service restart): reconnect and resume the session.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Final

import grpc
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from aiohttp.base_protocol import BaseProtocol
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from korero.chat.v1 import chat_pb2 as pb
from korero.server.conversation.engine import ConversationEngine
from korero.server.conversation.wire import error_event_body
from korero.server.errors import InvalidArgumentError, KoreroError, ShuttingDownError
from korero.server.handoff.service import HandoffService
from korero.server.policy.gate import CallGate
from korero.server.transport.agent_socket import AGENT_PATH, PROTOCOLS, AgentSocket
from korero.server.transport.chat_session import (
    ChatSession,
    StreamRules,
    cursor_of,
    read_first_frame,
)
from korero.server.transport.outbound import StreamWriter, queue_full

__all__ = [
    "BEARER_PREFIX",
    "CHAT_PATH",
    "JSON_PROTOCOL",
    "PROTO_PROTOCOL",
    "WebSocketServer",
    "close_code_for",
]

log = logging.getLogger(__name__)

CHAT_PATH: Final = "/ws/chat"
CHAT_METHOD: Final = "/korero.chat.v1.ChatService/Chat"
"""A socket is a Chat stream: the gate checks it as that method."""
PROTO_PROTOCOL: Final = "korero.chat.v1+proto"
JSON_PROTOCOL: Final = "korero.chat.v1+json"
BEARER_PREFIX: Final = "korero.bearer."
"""A subprotocol `korero.bearer.<base64url token>` carries `Bearer <token>`."""

# A ChatRequest is at most a message (KORERO_MAX_MESSAGE_BYTES) plus ids and
# metadata; anything far larger is refused by aiohttp with 1009 (too big).
_MAX_FRAME_BYTES: Final = 256 * 1024
_CLOSE_REASON_BYTES: Final = 123  # RFC 6455: a close frame's reason fits in 125 bytes
_CLOSE_WAIT: Final = 5.0
_ABANDON_WAIT: Final = 1.0  # seconds a close may wait on a client that is not reading


class _FrameError(InvalidArgumentError):
    """A frame the adapter cannot read: said in-band, then the socket closes with `close_code`."""

    def __init__(self, close_code: int, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.close_code = close_code


def close_code_for(error: KoreroError) -> int:
    """The WebSocket close code for an error that ends a socket.

    1003 (unsupported data) for a frame of the wrong type and 1007 (invalid
    payload) for one that is not a `ChatRequest`; 1012 (service restart) when
    the server drains, 1013 (try again later) for other retryable
    unavailability or exhaustion, 1011 for internal errors, and 1008 (policy
    violation) for everything else the client must change: credentials, the
    first frame, an unknown session.
    """
    if isinstance(error, _FrameError):
        return error.close_code
    if isinstance(error, ShuttingDownError):
        return int(WSCloseCode.SERVICE_RESTART)
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return int(WSCloseCode.TRY_AGAIN_LATER)
    if error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return int(WSCloseCode.INTERNAL_ERROR)
    return int(WSCloseCode.POLICY_VIOLATION)


def _close_reason(text: str) -> bytes:
    return text.encode()[:_CLOSE_REASON_BYTES]


class _Codec:
    """Reads ChatRequests and writes ChatResponses in the negotiated framing."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode

    def decode(self, msg: WSMessage) -> pb.ChatRequest:
        if self.json_mode:
            if msg.type != WSMsgType.TEXT:
                raise _FrameError(
                    int(WSCloseCode.UNSUPPORTED_DATA),
                    "FRAME_TYPE_INVALID",
                    f"{JSON_PROTOCOL} takes text frames",
                )
            try:
                return json_format.Parse(str(msg.data), pb.ChatRequest())
            except json_format.ParseError:
                raise _FrameError(
                    int(WSCloseCode.INVALID_TEXT),
                    "FRAME_INVALID",
                    "the frame is not a korero.chat.v1.ChatRequest in JSON",
                ) from None
        if msg.type != WSMsgType.BINARY:
            raise _FrameError(
                int(WSCloseCode.UNSUPPORTED_DATA),
                "FRAME_TYPE_INVALID",
                f"{PROTO_PROTOCOL} takes binary frames",
            )
        try:
            return pb.ChatRequest.FromString(bytes(msg.data))
        except DecodeError:
            raise _FrameError(
                int(WSCloseCode.INVALID_TEXT),
                "FRAME_INVALID",
                "the frame is not a korero.chat.v1.ChatRequest message",
            ) from None

    async def send(self, ws: web.WebSocketResponse, event: pb.Event) -> None:
        response = pb.ChatResponse(event=event)
        if self.json_mode:
            await ws.send_str(json_format.MessageToJson(response, indent=None))
        else:
            await ws.send_bytes(response.SerializeToString())


def _auth_frame(msg: WSMessage) -> str | None:
    """The `authorization` of a text frame `{"authorization": "…"}`, else None."""
    if msg.type != WSMsgType.TEXT:
        return None
    try:
        data = json.loads(str(msg.data))
    except ValueError:
        return None
    if isinstance(data, dict) and set(data) == {"authorization"}:
        value = data["authorization"]
        return value if isinstance(value, str) else None
    return None


def _authorization_from_handshake(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header:
        return header
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    for proto in (p.strip() for p in offered.split(",")):
        if proto.startswith(BEARER_PREFIX):
            token = proto[len(BEARER_PREFIX) :]
            try:
                decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError):
                return f"Bearer {token}"  # not base64url: let the authenticator judge it
            return f"Bearer {decoded}"
    return None


@dataclass(eq=False)  # identity semantics: connections live in a set
class _Connection:
    """One socket (one session)."""

    ws: web.WebSocketResponse
    codec: _Codec
    transport: asyncio.Transport | None = None
    protocol: BaseProtocol | None = None
    session: ChatSession | None = None
    ended: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def drain(self) -> None:
        if self.session is not None:
            self.session.drain()

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=code, message=_close_reason(reason))

    async def abandon(self, error: KoreroError) -> None:
        """Close for `error` a socket whose client stopped reading (its buffers are full):
        the close frame waits behind what is already queued for at most `_ABANDON_WAIT`,
        then the connection is cut."""
        self._unpoison_drain()
        try:
            async with asyncio.timeout(_ABANDON_WAIT):
                await self.close(close_code_for(error), f"{error.code.name} {error.reason}")
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()

    def _unpoison_drain(self) -> None:
        """Forget aiohttp's drain waiter if it was cancelled.

        Every write of a connection that finds the socket full awaits one shared
        future (`BaseProtocol._drain_waiter`), unshielded. Interrupting the send
        blocked on it (`StreamWriter.interrupt`) cancels that future, and aiohttp
        keeps it: the close frame's drain then raised CancelledError at once, so
        the bounded wait below never ran and the socket was never cut — a client
        that did not read again kept it open, with its buffers, for good.
        """
        protocol = self.protocol
        waiter = getattr(protocol, "_drain_waiter", None)
        if protocol is not None and waiter is not None and waiter.cancelled():
            protocol._drain_waiter = None  # the next drain makes a fresh one

    async def fail(self, error: KoreroError) -> None:
        """End the socket for `error`: say it in-band, then close with its code."""
        event = (
            self.session.rejection(error)
            if self.session is not None
            else pb.Event(error=error_event_body(error))
        )
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.codec.send(self.ws, event)
        await self.close(close_code_for(error), f"{error.code.name} {error.reason}")


class _ChatSocket:
    """The Chat logic of one socket: first frame, then messages and cancels."""

    def __init__(
        self,
        conn: _Connection,
        engine: ConversationEngine,
        rules: StreamRules,
        gate: CallGate,
        authorization: str | None,
        peer: str | None = None,
    ) -> None:
        self._conn = conn
        self._peer = peer
        self._engine = engine
        self._rules = rules
        self._gate = gate
        self._authorization = authorization

    async def run(self) -> None:
        conn = self._conn
        try:
            first = await self._first_frame()
            # The same gate as every gRPC call: authenticate, scope, tenant call limit.
            identity = await self._gate.admit(CHAT_METHOD, self._authorization, peer=self._peer)
            tenant = identity.tenant
            opened = await self._engine.open_session(
                tenant, first.start.session_id, first.start.metadata, cursor_of(first.start)
            )
        except KoreroError as error:
            await conn.fail(error)
            return
        session = ChatSession(self._engine, tenant, opened, self._rules)
        conn.session = session
        writer: StreamWriter[pb.Event] = StreamWriter(lambda event: conn.codec.send(conn.ws, event))
        session.on_overflow = writer.interrupt
        await writer.write(opened.started)
        reader = asyncio.create_task(self._read(session))
        try:
            async for event in session.outbound():
                if not await writer.write(event):
                    break
            ending = session.failure or (ShuttingDownError() if session.draining else None)
            if session.overflowed:
                await conn.abandon(queue_full())  # the client is not reading: no in-band event
            elif ending is not None:
                await conn.fail(ending)
        except (ConnectionError, RuntimeError):
            pass  # the socket went away while we wrote to it
        finally:
            reader.cancel()
            session.close()  # a turn still in flight: cancelled unless resumed within the grace

    async def _receive(self) -> WSMessage | None:
        """The next data message, or None when the socket closed."""
        msg = await self._conn.ws.receive()
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return None
        return msg

    async def _first_frame(self) -> pb.ChatRequest:
        async def receive() -> pb.ChatRequest | None:
            msg = await self._receive()
            if msg is not None and (authorization := _auth_frame(msg)) is not None:
                self._authorization = authorization
                msg = await self._receive()
            return None if msg is None else self._conn.codec.decode(msg)

        return await read_first_frame(receive, self._rules.first_frame_timeout, "chat socket")

    async def _read(self, session: ChatSession) -> None:
        """Hand each frame to the session; any failure ends the socket (in-band, then a code)."""
        conn = self._conn
        try:
            while (msg := await self._receive()) is not None:
                await session.handle(conn.codec.decode(msg))
        except KoreroError as error:  # a frame it cannot read
            session.fail(error)
            return
        except Exception:
            log.exception("event=ws_reader_failed session_id=%s", session.session_id)
            session.fail(KoreroError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error"))
            return
        # Closed (by either side): the outbound stream ends, and the turn in flight with it.
        session.end()


class _QuietRequestHandler(web.RequestHandler):
    """aiohttp's HTTP protocol, but a request it cannot parse gets a bare status line.

    aiohttp answers one with the parser's message, which quotes the offending
    bytes (a 4 KB garbage request line came back as an 11.6 KB 400), and logs
    them with a traceback. Here the answer is a few bytes and the log one line
    without the client's input.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not 400 <= status < 500:
            return super().handle_error(request, status, exc, message)
        log.debug("event=ws_bad_request status=%d error=%s", status, type(exc).__name__)
        response = web.Response(status=status, text=f"{status} {HTTPStatus(status).phrase}\n")
        response.force_close()
        return response


class WebSocketServer:
    """The aiohttp listener: `/ws/chat`, `/healthz`, and the chat page's files."""

    def __init__(
        self,
        *,
        engine: ConversationEngine,
        gate: CallGate,
        listen: str,
        rules: StreamRules,
        web_root: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        routes: Sequence[web.RouteDef] = (),
        handoff: HandoffService | None = None,
    ) -> None:
        self._engine = engine
        self._handoff = handoff
        self._gate = gate
        self._listen = listen
        self._rules = rules
        self._ssl_context = ssl_context
        self._routes = tuple(routes)
        self._connections: set[_Connection] = set()
        self._draining = False
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._web_root = web_root.resolve() if web_root is not None else None
        self.port = 0

    @property
    def open_sockets(self) -> int:
        return len(self._connections)

    @property
    def address(self) -> str:
        host = self._listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(CHAT_PATH, self._chat)
        if self._handoff is not None:
            app.router.add_get(AGENT_PATH, self._agent)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_routes(self._routes)
        if self._web_root is not None:
            app.router.add_get("/", self._page)
            app.router.add_get("/{name}", self._page)
        return app

    async def start(self) -> None:
        host, _, port = self._listen.rpartition(":")
        runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False)
        await runner.setup()
        server = runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        try:
            # Not web.TCPSite: connections get `_QuietRequestHandler` (see there).
            listener = await loop.create_server(
                # access_log=None turns access logs off, as AppRunner(access_log=None) does
                lambda: _QuietRequestHandler(server, loop=loop, access_log=None),  # type: ignore[arg-type]
                host or "127.0.0.1",
                int(port),
                reuse_port=True,
                ssl=self._ssl_context,
            )
        except OSError:
            await runner.cleanup()
            raise
        self._runner, self._listener = runner, listener
        self.port = int(listener.sockets[0].getsockname()[1])

    def begin_drain(self) -> None:
        """Refuse new sockets; idle sockets close now, busy ones after their turn."""
        self._draining = True
        for conn in self._connections:
            conn.drain()

    async def close(self) -> None:
        """Close what is still open (after the engine drained) and stop listening."""
        self.begin_drain()
        if self._connections:
            await asyncio.wait([c.ended for c in self._connections], timeout=_CLOSE_WAIT)
        for conn in list(self._connections):
            await conn.fail(ShuttingDownError())
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()  # closes the connections it still holds
            self._runner = None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            protocols=(PROTO_PROTOCOL, JSON_PROTOCOL), max_msg_size=_MAX_FRAME_BYTES
        )
        await ws.prepare(request)
        conn = _Connection(
            ws,
            _Codec(json_mode=ws.ws_protocol == JSON_PROTOCOL),
            transport=request.transport
            if isinstance(request.transport, asyncio.Transport)
            else None,
            protocol=request.protocol,
        )
        if self._draining:
            await conn.fail(ShuttingDownError())
            return ws
        self._connections.add(conn)
        try:
            await _ChatSocket(
                conn,
                self._engine,
                self._rules,
                self._gate,
                _authorization_from_handshake(request),
                peer=request.remote,
            ).run()
        except Exception:
            log.exception("event=ws_failed")
            await conn.fail(KoreroError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error"))
        finally:
            self._connections.discard(conn)
            conn.ended.set_result(None)
            if not ws.closed:
                await conn.close(int(WSCloseCode.OK), "")
        return ws

    async def _agent(self, request: web.Request) -> web.StreamResponse:
        """An agent desk (agent_socket.py)."""
        assert self._handoff is not None
        ws = web.WebSocketResponse(protocols=PROTOCOLS, max_msg_size=_MAX_FRAME_BYTES)
        await ws.prepare(request)
        if self._draining:
            await ws.close(code=int(WSCloseCode.SERVICE_RESTART), message=b"UNAVAILABLE draining")
            return ws
        try:  # desks are not drained: an agent reconnects within the grace period
            await AgentSocket(
                ws,
                service=self._handoff,
                gate=self._gate,
                authorization=_authorization_from_handshake(request),
                heartbeat_interval=self._rules.heartbeat_interval,
                first_frame_timeout=self._rules.first_frame_timeout,
                close_code=close_code_for,
                peer=request.remote,
            ).run()
        except Exception:
            log.exception("event=ws_agent_failed")
        finally:
            if not ws.closed:
                await ws.close()
        return ws

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        if self._draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ok\n")

    async def _page(self, request: web.Request) -> web.StreamResponse:
        assert self._web_root is not None
        name = request.match_info.get("name") or "index.html"
        path = (self._web_root / name).resolve()
        if path.parent != self._web_root or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

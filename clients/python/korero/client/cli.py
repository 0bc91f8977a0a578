"""The `korero` command: `chat`, `agent`, `health`, and whatever installed packages add.

The server package adds `serve` and `upstream-sim` through the
`korero.commands` entry-point group, so a client-only install stays small.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import stat
import sys
from importlib.metadata import entry_points
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.client import agent_cli
from korero.client._client import ChatClient, Conversation
from korero.client._errors import ChatError

__all__ = ["main"]

DEFAULT_TARGET = os.environ.get("KORERO_TARGET", "127.0.0.1:50051")

_CODE_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}

_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length limit",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_CONTENT_FILTER: "content filter",
}


def _ms(duration: object) -> str:
    nanos = duration.ToNanoseconds()  # type: ignore[attr-defined]
    return f"{nanos / 1e6:.0f} ms"


def _summary(done: pb.TurnDone) -> str:
    u = done.usage
    est = " est." if u.estimated else ""
    parts = [
        _FINISH.get(done.finish_reason, "done"),
        f"{u.total_tokens} tokens{est} ({u.input_tokens} in / {u.output_tokens} out)",
    ]
    if done.timings.HasField("time_to_first_token"):
        parts.append(f"first token {_ms(done.timings.time_to_first_token)}")
    parts.append(f"total {_ms(done.timings.total)}")
    if done.cached:
        parts.append("cached")
    return "[" + " · ".join(parts) + "]"


class _Terminal:
    """Line input from stdin without blocking the event loop."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None

    async def readline(self, prompt: str) -> str | None:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        loop = asyncio.get_running_loop()
        if self._reader is None and not stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode):
            with contextlib.suppress(ValueError, OSError):
                reader = asyncio.StreamReader()
                await loop.connect_read_pipe(
                    lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
                )
                self._reader = reader
        if self._reader is not None:
            raw = await self._reader.readline()
            line = raw.decode(errors="replace")
        else:
            line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return None
        return line.rstrip("\n")


def _notice(event: pb.Event) -> str:  # noqa: PLR0911 - one line per kind
    """A handoff event or an agent's message, as a line of the transcript."""
    kind = event.WhichOneof("kind")
    if kind == "handoff_requested":
        return f"bot> {event.handoff_requested.message}"
    if kind == "handoff_queued":
        q = event.handoff_queued
        minutes = max(1, round(q.estimated_wait.ToSeconds() / 60))
        return f"[queued for a person: number {q.position} in {q.queue}, about {minutes} min]"
    if kind == "agent_joined":
        return f"[{event.agent_joined.agent_display_name} joined the chat]"
    if kind == "agent_message":
        return f"{event.agent_message.agent_display_name}> {event.agent_message.text}"
    if kind == "agent_left":
        left = event.agent_left
        return f"[{left.agent_display_name} left the chat: {left.reason}]"
    if kind == "handoff_ended":
        return f"bot> {event.handoff_ended.message}"
    return ""


async def _print_notifications(conversation: Conversation, state: dict[str, bool]) -> None:
    """Handoff events and agent messages, as they come (between turns too)."""
    while True:
        event = await conversation.notifications.get()
        kind = event.WhichOneof("kind")
        if kind in ("handoff_requested", "handoff_queued", "agent_joined"):
            state["human"] = True
        elif kind == "handoff_ended":
            state["human"] = False
        line = _notice(event)
        if line:
            sys.stdout.write(f"\r{line}\nyou> ")
            sys.stdout.flush()


async def _turn(conversation: Conversation, text: str) -> None:
    loop = asyncio.get_running_loop()
    cancelling: list[asyncio.Task[None]] = []

    def on_interrupt() -> None:
        if not cancelling:
            cancelling.append(loop.create_task(conversation.cancel()))

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    sources: list[str] = []
    try:
        async for event in conversation.send(text):
            kind = event.WhichOneof("kind")
            if kind == "text_delta":
                sys.stdout.write(event.text_delta.text)
                sys.stdout.flush()
            elif kind == "citation":
                c = event.citation
                where = c.section if c.document_id.startswith("tool:") else f"section {c.section}"
                sources.append(f"  source: {c.document_title}, {where}")
            elif kind == "tool_call_started":
                call = event.tool_call_started
                shown = f" {call.arguments}" if call.arguments else ""
                print(f"[looking up: {call.source or call.name}{shown}]")
            elif kind == "tool_call_finished":
                done = event.tool_call_finished
                status = pb.ToolCallStatus.Name(done.status).removeprefix("TOOL_CALL_STATUS_")
                ms = done.duration.ToMilliseconds()
                print(f"[{done.name}: {status.lower()} in {ms} ms]")
            elif kind == "handoff_requested":
                print(f"\n[handing over to a person: {event.handoff_requested.reason}]", end="")
            elif kind == "message_relayed":
                pass  # a person owns the conversation: the message went to them
            elif kind == "done":
                print()
                for line in sources:
                    print(line)
                print(_summary(event.done))
            elif kind == "error":
                err = event.error
                print(
                    f"\n[error {_CODE_NAMES.get(err.code, err.code)} {err.reason}: {err.message}]"
                )
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _chat(args: argparse.Namespace) -> int:
    metadata = pb.SessionMetadata(
        customer_name=args.name or "", booking_reference=args.booking or ""
    )
    terminal = _Terminal()
    auth = [("authorization", f"Bearer {args.token}")] if args.token else []
    try:
        credentials, options = _transport(args)
    except OSError as exc:
        print(f"korero chat: {exc}", file=sys.stderr)
        return 2
    async with ChatClient(
        args.target, metadata=auth, credentials=credentials, options=options
    ) as client:
        try:
            conversation = await client.conversation(args.session or "", metadata)
        except ChatError as error:
            print(f"korero chat: cannot open a session at {args.target}: {error}", file=sys.stderr)
            return 1
        started = conversation.started.session_started
        verb = "resumed" if started.resumed else "started"
        print(
            f"session {conversation.session_id} {verb} "
            f"({started.session.message_count} messages). "
            "Ctrl-C cancels an answer; /human asks for a person, /bot leaves the queue; "
            "Ctrl-D or /quit leaves."
        )
        state = {"human": False}
        printer = asyncio.create_task(_print_notifications(conversation, state))
        try:
            while True:
                try:
                    line = await terminal.readline("you> ")
                except KeyboardInterrupt:
                    line = None
                if line is None or line.strip() in ("/quit", "/exit"):
                    break
                if not line.strip():
                    continue
                if line.strip().split(" ", 1)[0] == "/human":
                    await conversation.request_handoff(line.strip()[len("/human") :].strip())
                    continue
                if line.strip() == "/bot":  # leave the queue for a person
                    await conversation.withdraw_handoff()
                    continue
                if not state["human"]:
                    sys.stdout.write("bot> ")
                reconnects = conversation.reconnects
                await _turn(conversation, line)
                if conversation.reconnects > reconnects:
                    # The stream broke and was resumed from the last seq: nothing was lost.
                    print(f"[reconnected {conversation.reconnects - reconnects}x, nothing missed]")
        except ChatError as error:
            printer.cancel()
            print(f"\nkorero chat: stream ended: {error}", file=sys.stderr)
            print(f"resume with: korero chat --session {conversation.session_id}", file=sys.stderr)
            return 1
        printer.cancel()
        print(f"\nresume with: korero chat --session {conversation.session_id}")
        await conversation.close()
    return 0


async def _health(args: argparse.Namespace) -> int:
    try:
        credentials, options = _transport(args)
    except OSError as exc:
        print(f"korero health: {exc}", file=sys.stderr)
        return 2
    channel = (
        grpc.aio.secure_channel(args.target, credentials, options=options)
        if credentials is not None
        else grpc.aio.insecure_channel(args.target, options=options)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.aio.AioRpcError as error:
            print(f"{args.target}: {ChatError.from_rpc_error(error)}", file=sys.stderr)
            return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def _transport(
    args: argparse.Namespace,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    """TLS credentials and channel options from --tls/--ca/--cert/--key/--server-name."""
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    if not (args.tls or args.ca or args.cert):
        return None, options
    if bool(args.cert) != bool(args.key):
        raise OSError("--cert and --key go together (a client certificate and its key)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.ca).read_bytes() if args.ca else None,
        private_key=Path(args.key).read_bytes() if args.key else None,
        certificate_chain=Path(args.cert).read_bytes() if args.cert else None,
    )
    return credentials, options


def _add_tls_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS (grpcurl: no -plaintext, -cacert, -cert, -key)")
    group.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    group.add_argument("--ca", metavar="FILE", help="PEM CA to trust instead (implies --tls)")
    group.add_argument(
        "--cert", metavar="FILE", help="PEM client certificate for mutual TLS (implies --tls)"
    )
    group.add_argument("--key", metavar="FILE", help="PEM private key of --cert")
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help="name to verify in the server's certificate, when it differs from the target host",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="korero", description="Kōrero chat backend: server, client and tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chat = sub.add_parser(
        "chat",
        help="chat with a server in the terminal",
        description="Open a Chat stream and talk. Answers stream in as they are generated; "
        "Ctrl-C cancels the answer in flight (the session stays), /human [REASON] asks for "
        "a person, /bot leaves the queue for one, Ctrl-D or /quit leaves.",
    )
    chat.add_argument("--target", default=DEFAULT_TARGET, help="server HOST:PORT [%(default)s]")
    chat.add_argument("--session", help="resume this session id instead of starting a new one")
    chat.add_argument("--name", help="customer name stored with a new session")
    chat.add_argument("--booking", help="booking reference stored with a new session")
    chat.add_argument(
        "--token",
        default=os.environ.get("KORERO_TOKEN", ""),
        help="API key or JWT sent as `authorization: Bearer` [$KORERO_TOKEN]",
    )
    _add_tls_flags(chat)
    chat.set_defaults(func=lambda a: asyncio.run(_chat(a)))
    health = sub.add_parser(
        "health",
        help="probe a server's grpc.health.v1 status",
        description="Exit 0 when SERVING, 1 when not, 2 when unreachable.",
    )
    health.add_argument("--target", default=DEFAULT_TARGET, help="server HOST:PORT [%(default)s]")
    health.add_argument("--service", default="", help="service name; empty means the whole server")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds [%(default)s]")
    _add_tls_flags(health)
    health.set_defaults(func=lambda a: asyncio.run(_health(a)))
    agent_cli.register(sub, DEFAULT_TARGET, _Terminal)
    for entry in entry_points(group="korero.commands"):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

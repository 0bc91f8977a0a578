"""The `korero` command: `chat`, `health`, and whatever installed packages add.

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

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from korero.chat.v1 import chat_pb2 as pb
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
    async with ChatClient(args.target, metadata=auth) as client:
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
            "Ctrl-C cancels an answer; Ctrl-D or /quit leaves."
        )
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
                sys.stdout.write("bot> ")
                await _turn(conversation, line)
        except ChatError as error:
            print(f"\nkorero chat: stream ended: {error}", file=sys.stderr)
            print(f"resume with: korero chat --session {conversation.session_id}", file=sys.stderr)
            return 1
        print(f"\nresume with: korero chat --session {conversation.session_id}")
        await conversation.close()
    return 0


async def _health(args: argparse.Namespace) -> int:
    async with grpc.aio.insecure_channel(args.target) as channel:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="korero", description="Kōrero chat backend: server, client and tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chat = sub.add_parser(
        "chat",
        help="chat with a server in the terminal",
        description="Open a Chat stream and talk. Answers stream in as they are generated; "
        "Ctrl-C cancels the answer in flight (the session stays), Ctrl-D or /quit leaves.",
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
    chat.set_defaults(func=lambda a: asyncio.run(_chat(a)))
    health = sub.add_parser(
        "health",
        help="probe a server's grpc.health.v1 status",
        description="Exit 0 when SERVING, 1 when not, 2 when unreachable.",
    )
    health.add_argument("--target", default=DEFAULT_TARGET, help="server HOST:PORT [%(default)s]")
    health.add_argument("--service", default="", help="service name; empty means the whole server")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds [%(default)s]")
    health.set_defaults(func=lambda a: asyncio.run(_health(a)))
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

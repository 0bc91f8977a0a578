"""The reference: a minimal grpcio asyncio bidi echo server on the same proto.

It implements `korero.chat.v1.ChatService/Chat` and nothing else: every
request's `message.text` comes straight back as one `text_delta` event. No
Redis, no upstream, no coalescing — the message rate raw grpcio aio reaches
on this machine, the yardstick for Kōrero's delivered text throughput.

    python -m bench.echo_server --port 50099
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvloop

from korero.chat.v1 import chat_pb2 as pb
from korero.chat.v1 import chat_pb2_grpc

__all__ = ["EchoServicer", "serve"]


class EchoServicer(chat_pb2_grpc.ChatServiceServicer):
    """Chat as an echo: one text delta per request message."""

    async def Chat(  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ChatRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ChatResponse]:
        seq = 0
        async for request in request_iterator:
            seq += 1
            yield pb.ChatResponse(
                event=pb.Event(
                    session_id="echo", seq=seq, text_delta=pb.TextDelta(text=request.message.text)
                )
            )


async def serve(port: int) -> None:
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1), ("grpc.max_concurrent_streams", 100_000)]
    )
    chat_pb2_grpc.add_ChatServiceServicer_to_server(EchoServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__)
    parser.add_argument("--port", type=int, default=50099, help="loopback port (default 50099)")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()

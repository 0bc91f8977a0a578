"""The floor under CPU per turn: what the parts a turn cannot avoid cost on their own.

A streamed turn of the `cpu` scenario (32 tokens 20 ms apart, ≈ 22 coalesced
deltas) has to, at the least: send its events over grpcio aio, make one
streamed HTTP request upstream and read every token as it arrives, and make
its Redis round trips. This measures each of those alone, at the same
cadence (no batching), with the libraries the server uses, CPU seconds from
/proc of the one process doing the work:

- grpc: a bare grpcio aio `Chat` servicer (no Kōrero code) that answers each
  message with `--events` events 30 ms apart (the coalescer's window), CPU
  per event sent;
- upstream: the `openai` client's generic `post` over Kōrero's aiohttp
  transport, and aiohttp alone, reading the simulated upstream's answers
  (50 ms to the first token, 32 tokens 20 ms apart), CPU per answer;
- redis: one pipelined `EVALSHA` of a small script with redis-py's asyncio
  client, CPU per round trip.

    .venv/bin/python -m bench.floor
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from bench.procs import ProcessGroup, loadavg

__all__ = ["main"]

QUESTION = "What is the baggage allowance on my booking?"


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- grpc: events sent by a bare servicer ------------------------------------------------


async def _grpc(streams: int, turns: int, events: int) -> float:
    import grpc  # noqa: PLC0415

    from korero.chat.v1 import chat_pb2 as pb  # noqa: PLC0415
    from korero.chat.v1 import chat_pb2_grpc  # noqa: PLC0415

    class Paced(chat_pb2_grpc.ChatServiceServicer):
        async def Chat(  # noqa: N802
            self, request_iterator: AsyncIterator[Any], context: Any
        ) -> AsyncIterator[Any]:
            seq = 0
            async for request in request_iterator:
                for _ in range(events):
                    seq += 1
                    yield pb.ChatResponse(
                        event=pb.Event(
                            session_id="s", turn_id="t1", seq=seq,
                            text_delta=pb.TextDelta(text=request.message.text),
                        )
                    )  # fmt: skip
                    await asyncio.sleep(0.03)

    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(Paced(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # The client runs in another process, so only the server's work is in this one.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.floor", "--grpc-client", f"127.0.0.1:{port}",
        str(streams), str(turns), str(events),
    )  # fmt: skip
    await asyncio.sleep(1.5)  # the client's imports; it waits 2 s before its first call
    c0 = _cpu()
    await proc.wait()
    cpu = _cpu() - c0
    await server.stop(None)
    return cpu / (streams * turns * events)


async def _grpc_client(host: str, streams: int, turns: int, events: int) -> None:
    import grpc  # noqa: PLC0415

    from korero.chat.v1 import chat_pb2 as pb  # noqa: PLC0415
    from korero.chat.v1 import chat_pb2_grpc  # noqa: PLC0415

    await asyncio.sleep(2)  # the parent starts counting after its start-up
    async with grpc.aio.insecure_channel(host) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def one() -> None:
            call = stub.Chat()
            for _ in range(turns):
                await call.write(pb.ChatRequest(message=pb.UserMessage(text=" token")))
                for _ in range(events):
                    await call.read()
            await call.done_writing()

        await asyncio.gather(*(one() for _ in range(streams)))


# -- upstream: one streamed answer read -----------------------------------------------------


async def _upstream(base_url: str, answers: int, concurrency: int, raw: bool) -> float:
    import dataclasses  # noqa: PLC0415

    from korero.server.llm.provider import LLMRequest, OpenAIProvider  # noqa: PLC0415
    from korero.server.settings import LLMSettings  # noqa: PLC0415

    messages = [
        {"role": "system", "content": "You are a helpful support assistant. " * 20},
        {"role": "user", "content": QUESTION},
    ]
    provider = OpenAIProvider(dataclasses.replace(LLMSettings(), base_url=base_url, api_key="x"))
    request = LLMRequest(messages, "korero-sim-1", 512, 0.2)
    import aiohttp  # noqa: PLC0415

    session = aiohttp.ClientSession() if raw else None

    async def one() -> None:
        if session is None:
            async for _ in provider.stream(request):
                pass
            return
        body = {"model": "korero-sim-1", "messages": messages, "stream": True}
        async with session.post(f"{base_url}/chat/completions", json=body) as response:
            async for _ in response.content.iter_any():
                pass

    for _ in range(5):
        await one()
    sem = asyncio.Semaphore(concurrency)

    async def limited() -> None:
        async with sem:
            await one()

    c0 = _cpu()
    await asyncio.gather(*(limited() for _ in range(answers)))
    cpu = _cpu() - c0
    await provider.aclose()
    if session is not None:
        await session.close()
    return cpu / answers


# -- redis: a pipelined EVALSHA ---------------------------------------------------------------


async def _redis(url: str, round_trips: int, concurrency: int) -> float:
    import redis.asyncio as aioredis  # noqa: PLC0415

    client = aioredis.Redis.from_url(url)
    script = client.register_script(
        "redis.call('HSET', KEYS[1], 'a', ARGV[1]) return redis.call('HGETALL', KEYS[1])"
    )
    await script(keys=["k0"], args=["1"])

    async def one(i: int) -> None:
        async with client.pipeline(transaction=False) as pipe:
            pipe.evalsha(script.sha, 1, f"k{i % 100}", "1")
            await pipe.execute()

    sem = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> None:
        async with sem:
            await one(i)

    c0 = _cpu()
    for start in range(0, round_trips, 1000):
        await asyncio.gather(*(limited(i) for i in range(start, min(round_trips, start + 1000))))
        await asyncio.sleep(0.001)
    cpu = _cpu() - c0
    await client.aclose()
    return cpu / round_trips


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    p.add_argument("--grpc-client", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--events", type=int, default=22, help="events per turn (default 22)")
    p.add_argument("--round-trips", type=int, default=3, help="Redis round trips per turn")
    args = p.parse_args(argv)
    import uvloop  # noqa: PLC0415

    if args.grpc_client:
        host, streams, turns, events = args.grpc_client
        uvloop.run(_grpc_client(host, int(streams), int(turns), int(events)))
        return 0
    print(f"load average {loadavg():.2f}")
    grpc_event = uvloop.run(_grpc(40, 6, args.events))
    with ProcessGroup() as g:
        llm, _ = g.sim(ttft_ms=50, tokens_per_second=50, answer_tokens=32)
        answer = uvloop.run(_upstream(llm, 200, 40, raw=False))
        raw_answer = uvloop.run(_upstream(llm, 200, 40, raw=True))
        redis_url, _, _ = g.redis()
        round_trip = uvloop.run(_redis(redis_url, 20_000, 40))
    floor = args.events * grpc_event + answer + args.round_trips * round_trip
    print(f"grpc aio, one event sent:                     {grpc_event * 1e6:7.1f} µs")
    print(f"upstream answer (openai post + aiohttp):       {answer * 1e6:7.1f} µs")
    print(f"upstream answer (aiohttp alone, no SDK):       {raw_answer * 1e6:7.1f} µs")
    print(f"redis-py pipelined EVALSHA round trip:          {round_trip * 1e6:7.1f} µs")
    print(
        f"floor per turn: {args.events} events + 1 answer + {args.round_trips} round trips = "
        f"{floor * 1e3:.2f} ms CPU (no Kōrero code at all)"
    )
    print(f"load average {loadavg():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

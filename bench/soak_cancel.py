"""Soak: do cancelled streaming calls leak server memory? (grpc/grpc#43360)

Starts a private Redis, the simulated upstream (slow answers) and one
`korero serve` on free loopback ports, then runs rounds of streams that each
start a turn and go away mid-answer — half by a `cancel` frame, half by the
client cancelling the call (a disconnect). After every round it reads the
server's RSS. Bounded: `--rounds` rounds of `--streams` streams.

    .venv/bin/python -m bench.soak_cancel [--rounds 12] [--streams 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.chat.v1 import chat_pb2_grpc
from korero.sim import SimConfig, UpstreamSim
from korero.testing import PrivateRedis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _one(stub: chat_pb2_grpc.ChatServiceStub, i: int) -> None:
    call = stub.Chat()
    await call.write(pb.ChatRequest(start=pb.StartSession()))
    await call.read()
    await call.write(
        pb.ChatRequest(message=pb.UserMessage(client_message_id=f"m{i}", text="tell me a story"))
    )
    while True:  # until the first text delta
        response = await call.read()
        if response is grpc.aio.EOF or response.event.WhichOneof("kind") == "text_delta":
            break
    if i % 2:
        call.cancel()  # the client goes away mid-answer
        return
    await call.write(pb.ChatRequest(cancel=pb.CancelTurn()))
    while True:  # until the turn's terminal event
        response = await call.read()
        if response is grpc.aio.EOF or response.event.WhichOneof("kind") in ("done", "error"):
            break
    call.cancel()


async def _soak(rounds: int, streams: int) -> None:
    grpc_port = _free_port()
    redis = PrivateRedis(Path(tempfile.mkdtemp()))
    redis.start()
    async with UpstreamSim(SimConfig(tokens_per_second=20, answer_tokens=200)) as sim:
        env = {
            **os.environ,
            "REDIS_URL": redis.url,
            "KORERO_LLM_BASE_URL": sim.base_url,
            "KORERO_RATE_LIMITS": "false",
            "KORERO_METRICS_LISTEN": "off",
            "KORERO_WS_LISTEN": "off",
            "KORERO_LOG_LEVEL": "WARNING",
        }
        server = subprocess.Popen(
            [
                os.path.join(os.path.dirname(sys.executable), "korero"),
                "serve",
                "--workers",
                "1",
                "--listen",
                f"127.0.0.1:{grpc_port}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(3)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = chat_pb2_grpc.ChatServiceStub(channel)
                rss = [_rss_mib(server.pid)]
                started = time.monotonic()
                for r in range(rounds):
                    await asyncio.wait_for(
                        asyncio.gather(*(_one(stub, r * streams + i) for i in range(streams))),
                        120,
                    )
                    await asyncio.sleep(1)
                    rss.append(_rss_mib(server.pid))
                    print(
                        f"round {r + 1:>3}: {streams} cancelled turns, server RSS {rss[-1]:.1f} MiB"
                    )
            warm = rss[min(2, len(rss) - 1)]
            total = rounds * streams
            print(
                f"grpcio {grpc.__version__}: {total} cancelled turns in "
                f"{time.monotonic() - started:.0f} s; RSS {rss[0]:.1f} MiB idle, "
                f"{warm:.1f} after 2 rounds, {rss[-1]:.1f} at the end "
                f"({(rss[-1] - warm) * 1024 / max(1, total - 2 * streams):.2f} KiB per "
                "cancelled turn after warm-up)"
            )
            print(
                f"upstream disconnects recorded: "
                f"{sum(1 for x in sim.requests if x.disconnected_at is not None)} of "
                f"{len(sim.requests)} requests"
            )
        finally:
            server.kill()
            server.wait()
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="rounds [%(default)s]")
    parser.add_argument("--streams", type=int, default=200, help="streams per round [%(default)s]")
    args = parser.parse_args()
    asyncio.run(_soak(args.rounds, args.streams))


if __name__ == "__main__":
    main()

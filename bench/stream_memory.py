"""Server memory per held stream: raw grpcio echo server vs Kōrero, same client.

Starts each server as its own process on a free loopback port, opens 200
streams to warm it up, then 2,000 more (8 connections), and reports the RSS
growth per stream. The echo server (`bench/echo_server.py`) is the floor set by
grpcio aio itself: a bidi call parked on its next read. Kōrero runs against
the machine's Redis (REDIS_URL) with rate limits off so the opens are not
refused; its streams are open sessions (after `start`), idle.

    .venv/bin/python -m bench.stream_memory [--streams 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
from typing import Any

import grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.chat.v1 import chat_pb2_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _hold(target: str, n: int, korero: bool) -> list[Any]:
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(8)
    ]
    held: list[Any] = list(channels)
    for i in range(n):
        call = chat_pb2_grpc.ChatServiceStub(channels[i % 8]).Chat()
        first = (
            pb.ChatRequest(start=pb.StartSession())
            if korero
            else pb.ChatRequest(message=pb.UserMessage(client_message_id="x", text="hi"))
        )
        await call.write(first)
        await call.read()
        held.append(call)
    return held


async def _measure(command: list[str], env: dict[str, str], korero: bool, n: int) -> float:
    proc = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        port = int(command[-1].rsplit(":", 1)[-1])
        target = f"127.0.0.1:{port}"
        for _ in range(600):  # until it listens (imports take seconds on a busy machine)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        warm = await _hold(target, 200, korero)
        await asyncio.sleep(1)
        before = _rss_kib(proc.pid)
        held = await _hold(target, n, korero)
        await asyncio.sleep(2)
        after = _rss_kib(proc.pid)
        for item in (*warm, *held):
            if isinstance(item, grpc.aio.Channel):
                await item.close()
        return (after - before) / n
    finally:
        proc.kill()
        proc.wait()


async def _main(n: int, baseline: str | None) -> None:
    bin_dir = os.path.dirname(sys.executable)
    echo_port = _free_port()
    echo = await _measure(
        [sys.executable, "-m", "bench.echo_server", "--port", str(echo_port)], {}, False, n
    )
    env = {
        "KORERO_METRICS_LISTEN": "off",
        "KORERO_WS_LISTEN": "off",
        "KORERO_LOG_LEVEL": "WARNING",
        "KORERO_RATE_LIMITS": "false",
        "KORERO_WORKERS": "1",  # one process (a baseline's CLI may not take --workers)
    }
    korero = await _measure(
        [f"{bin_dir}/korero", "serve", "--workers", "1", "--listen", f"127.0.0.1:{_free_port()}"],
        env,
        True,
        n,
    )
    print(f"grpcio {grpc.__version__}, {n} streams held")
    print(f"raw grpcio echo server: {echo:.1f} KiB per held stream")
    print(f"Kōrero, idle session:   {korero:.1f} KiB per held stream (own {korero - echo:.1f})")
    if baseline:
        command = [baseline, "-m", "korero.client.cli", "serve", "--listen"]
        base = await _measure([*command, f"127.0.0.1:{_free_port()}"], env, True, n)
        print(f"baseline, idle session: {base:.1f} KiB per held stream (own {base - echo:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000, help="streams to hold [%(default)s]")
    parser.add_argument("--baseline-python", help="also measure the server run by this interpreter")
    args = parser.parse_args()
    asyncio.run(_main(args.streams, args.baseline_python))


if __name__ == "__main__":
    main()

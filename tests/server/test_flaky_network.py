"""A flaky network: conversations over a loopback TCP proxy that cuts every connection
after a random lifetime (mid-answer, between turns, during a replay), each reconnect
landing on a randomly chosen one of two server instances. The client resumes from its
last seq every time. Afterwards: every client's text equals the stored answer, its seqs
run 1, 2, 3, … with no gap and no duplicate, and the model was asked once per turn.

The suite runs 60 conversations; the issue's 1,000 run in the `slow` variant (and
`KORERO_FLAKY_CONVERSATIONS=N` sets any number).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, ChatError, Conversation, Reconnect
from korero.server.app import KoreroServer
from korero.sim import SimConfig, UpstreamSim
from korero.testing import FlakyProxy
from tests.conftest import make_settings

TURNS = 2
CONCURRENCY = 40
# Per break. Connections live 0.1-0.8 s here; on a loaded machine an open can take
# longer than that, so one break may need many tries (12 ran out for 4 of 1,000
# conversations while a 100,000-stream load test shared the two cores).
RECONNECT = Reconnect(attempts=30, initial_backoff=0.05, max_backoff=0.5)


@dataclass
class Outcome:
    session_id: str = ""
    seqs: list[int] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # turn id -> text received
    failures: list[str] = field(default_factory=list)
    reconnects: int = 0


@pytest.fixture
async def flaky_sim() -> AsyncIterator[UpstreamSim]:
    # About 0.6 s an answer: long enough to be cut mid-answer most of the time.
    async with UpstreamSim(SimConfig(ttft=0.03, tokens_per_second=60, answer_tokens=36)) as up:
        yield up


async def _open(client: ChatClient) -> Conversation:
    last: ChatError | None = None
    # Like RECONNECT: a channel whose connection was just cut fails calls at once while
    # it reconnects, and on a loaded machine that lasted past 20 tries 0.05 s apart.
    for attempt in range(RECONNECT.attempts):
        try:
            return await client.conversation()
        except ChatError as error:  # cut before session_started: start another session
            last = error
            await asyncio.sleep(min(RECONNECT.max_backoff, 0.05 * 1.5**attempt))
    assert last is not None
    raise last


async def _converse(index: int, target: str, gate: asyncio.Semaphore) -> Outcome:
    out = Outcome()
    # A connection of its own per client (grpcio shares them between channels otherwise),
    # so each conversation is cut on its own schedule.
    channel = grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 500),
        ],
    )
    async with gate, ChatClient(target, channel=channel, reconnect=RECONNECT) as client:
        conversation = await _open(client)
        out.session_id = conversation.session_id
        for turn in range(TURNS):
            pieces: list[str] = []
            terminal = ""
            turn_id = ""
            try:
                async for event in conversation.send(
                    f"conversation {index} question {turn}", f"f{index}-{turn}"
                ):
                    out.seqs.append(event.seq)
                    turn_id = event.turn_id or turn_id
                    kind = event.WhichOneof("kind")
                    if kind == "text_delta":
                        pieces.append(event.text_delta.text)
                    elif kind in ("done", "error"):
                        terminal = kind if kind == "done" else event.error.reason
            except ChatError as error:
                terminal = f"raised {error.reason or error.code.name}"
            if terminal != "done":
                out.failures.append(f"turn {turn}: {terminal}")
                break
            out.texts[turn_id] = "".join(pieces)
        out.reconnects = conversation.reconnects
        await conversation.close()
    return out


async def _run(redis_url: str, sim: UpstreamSim, conversations: int) -> None:
    settings = make_settings(
        redis_url,
        sim.base_url,
        engine__detach_grace=30.0,  # a loaded machine (CI) may take seconds to reconnect
        # Counted exactly below: an early upstream request (conversation/early.py) that
        # a resend makes redundant is cancelled before its first token but still counts
        # as a request at the simulator (5 in 2,000 turns under load).
        engine__early_upstream=False,
        limits__enabled=False,
        cache__enabled=False,  # every turn must reach the model exactly once
        server__ws_listen=None,
    )
    servers = [await KoreroServer.start(settings) for _ in range(2)]
    try:
        backends = [("127.0.0.1", s.port) for s in servers]
        async with FlakyProxy(backends, lifetime=(0.1, 0.8), seed=11) as proxy:
            gate = asyncio.Semaphore(CONCURRENCY)
            target = f"127.0.0.1:{proxy.port}"
            async with asyncio.timeout(60 + conversations * 0.5):
                outcomes = await asyncio.gather(
                    *(_converse(i, target, gate) for i in range(conversations))
                )
        reconnects = sum(o.reconnects for o in outcomes)
        print(
            f"\nflaky network: {conversations} conversations x {TURNS} turns, "
            f"{proxy.connections} connections ({proxy.per_backend} per instance), "
            f"{proxy.cuts} cut, {reconnects} resumes, {len(sim.requests)} upstream calls"
        )
        failures = [(o.session_id, f) for o in outcomes for f in o.failures]
        assert failures == [], failures[:10]
        # Seqs: 1, 2, 3, ... on every conversation, whatever the cuts.
        for o in outcomes:
            assert o.seqs == list(range(1, len(o.seqs) + 1)), (o.session_id, o.seqs)
        # Text: what each client put together is what the server stored.
        async with ChatClient(f"127.0.0.1:{servers[0].port}") as direct:
            for o in outcomes:
                history = await direct.list_messages(o.session_id)
                stored = {
                    m.turn_id: m.text for m in history.messages if m.role == pb.ROLE_ASSISTANT
                }
                assert stored == o.texts, o.session_id
        # The model: one call per turn, none repeated by a resume.
        assert len(sim.requests) == conversations * TURNS
        assert proxy.cuts > conversations / 2  # the network really was flaky
        assert reconnects > 0
    finally:
        for server in servers:
            await server.shutdown(grace=0.5)


async def test_flaky_network_resume_across_two_instances(
    redis_url: str, flaky_sim: UpstreamSim
) -> None:
    await _run(redis_url, flaky_sim, int(os.environ.get("KORERO_FLAKY_CONVERSATIONS", "60")))


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_flaky_network_one_thousand_conversations(
    redis_url: str, flaky_sim: UpstreamSim
) -> None:
    await _run(redis_url, flaky_sim, 1000)

"""Early upstream requests (conversation/early.py): sent while the turn's Redis
round trips run, used only when begin-turn confirms their prompt, closed and
counted otherwise; nothing is acknowledged before the message is persisted."""

from __future__ import annotations

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.sim import SimConfig, UpstreamSim
from tests.conftest import make_settings
from tests.helpers import kinds, run_turn, text_of


def _count(app: KoreroServer, outcome: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "korero_early_requests_total", {"outcome": outcome}
    )
    return value or 0.0


async def test_the_next_turn_of_a_session_asks_the_model_early_with_the_same_prompt(
    redis_url: str, sim: UpstreamSim
) -> None:
    app = await KoreroServer.start(
        make_settings(redis_url, sim.base_url, engine__early_upstream=True)
    )
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation(
                metadata=pb.SessionMetadata(customer_name="Aroha")
            )
            texts = []
            for n in range(4):
                events = await run_turn(conversation, f"Where is my booking, take {n}?", f"e{n}")
                # Persist before acknowledge: turn_started before any text, one terminal.
                assert kinds(events)[0] == "turn_started"
                assert kinds(events)[-1] == "done"
                texts.append(text_of(events))
            # The first turn waited (this process did not know the KB version yet);
            # the others, and a new session's first turn, asked early.
            assert _count(app, "used") == 3
            last = sim.requests[-1].body["messages"]
            other = await client.conversation()
            assert kinds(await run_turn(other, "And my booking?", "o1"))[-1] == "done"
        assert _count(app, "used") == 4
        assert _count(app, "stale") == _count(app, "refused") == 0
        assert len(sim.requests) == 5  # one upstream request per turn, none wasted
        # The prompts are what the store's history gives: each holds the earlier turns.
        assert [m["role"] for m in last[1:]] == ["user", "assistant"] * 3 + ["user"]
        assert last[-2]["content"] == texts[2]
        assert "Aroha" in last[0]["content"]
    finally:
        await app.shutdown(grace=0)


async def test_a_turn_elsewhere_makes_the_early_request_stale_and_it_is_closed(
    redis_url: str, sim: UpstreamSim
) -> None:
    one = await KoreroServer.start(
        make_settings(redis_url, sim.base_url, engine__early_upstream=True)
    )
    two = await KoreroServer.start(
        make_settings(redis_url, sim.base_url, engine__early_upstream=True)
    )
    try:
        async with (
            ChatClient(f"127.0.0.1:{one.port}") as c1,
            ChatClient(f"127.0.0.1:{two.port}") as c2,
        ):
            first = await c1.conversation()
            assert kinds(await run_turn(first, "My booking, first question", "s1"))[-1] == "done"
            # The same session, resumed on another instance, gets a turn there.
            elsewhere = await c2.conversation(session_id=first.session_id)
            assert (
                kinds(await run_turn(elsewhere, "My booking, asked elsewhere", "s2"))[-1] == "done"
            )
            sim.config = SimConfig(ttft=0.5)  # the early request is still waiting when it is closed
            events = await run_turn(first, "My booking, back on the first", "s3")
            assert kinds(events)[-1] == "done"
        assert _count(one, "stale") == 1
        early, fresh = sim.requests[-2], sim.requests[-1]
        await sim.wait_for(lambda r: r.id == early.id and r.disconnected_at is not None, timeout=3)
        # The answer came from a prompt built from the store: it holds the other turn.
        contents = [m["content"] for m in fresh.body["messages"]]
        assert "My booking, asked elsewhere" in contents
        assert "My booking, asked elsewhere" not in [m["content"] for m in early.body["messages"]]
    finally:
        await one.shutdown(grace=0)
        await two.shutdown(grace=0)


async def test_turned_off_every_turn_waits_for_redis_first(
    redis_url: str, sim: UpstreamSim
) -> None:
    app = await KoreroServer.start(
        make_settings(redis_url, sim.base_url, engine__early_upstream=False)
    )
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            for n in range(2):
                assert kinds(await run_turn(conversation, f"My booking {n}", f"w{n}"))[-1] == "done"
        assert _count(app, "used") == 0
        assert len(sim.requests) == 2
    finally:
        await app.shutdown(grace=0)

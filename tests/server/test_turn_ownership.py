"""Turn ownership under faults: a crashed instance, a paused Redis.

A turn holds its session by a short lease it renews while it runs; a turn
whose instance died is declared failed by the next message once the lease
runs out, and the message runs again without being stored twice. A Redis
write whose outcome a timeout left unknown is resolved before the client is
told anything: history and turn records afterwards say what the client saw.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, Conversation
from korero.server.app import KoreroServer
from korero.sim import SimConfig, UpstreamSim
from tests.conftest import RedisProcess, make_settings
from tests.helpers import kinds, run_turn, terminals, text_of
from tests.server.test_lifecycle import start_server_process


def _meta(redis: RedisProcess, session_id: str) -> dict[str, str]:
    raw = redis.client().hgetall(f"kr:{{default:{session_id}}}:meta")
    return {k.decode(): v.decode() for k, v in raw.items()}


def _record(redis: RedisProcess, session_id: str, cmid: str) -> dict[str, object] | None:
    raw = redis.client().hget(f"kr:{{default:{session_id}}}:turns", cmid)
    return None if raw is None else dict(json.loads(raw))


async def _history(client: ChatClient, session_id: str) -> list[tuple[str, str]]:
    page = await client.list_messages(session_id)
    role = {pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
    return [(role.get(m.role, "?"), m.text) for m in page.messages]


async def _until_terminal(conversation: Conversation, text: str, cmid: str) -> list[pb.Event]:
    async with asyncio.timeout(30):
        return await run_turn(conversation, text, cmid)


# 1. A crashed instance ------------------------------------------------------------


@pytest.mark.slow
async def test_a_killed_instance_frees_its_session_within_seconds(
    redis_proc: RedisProcess, redis_url: str, sim: UpstreamSim
) -> None:
    sim.config = SimConfig(tokens_per_second=5, answer_tokens=60)  # 12 s: still running
    env = {
        "REDIS_URL": redis_url,
        "KORERO_LLM_BASE_URL": sim.base_url,
        "KORERO_METRICS_LISTEN": "127.0.0.1:0",
    }
    first = await start_server_process(env)
    second = None
    try:
        async with ChatClient(first.target) as client:
            conversation = await client.conversation()
            session_id = conversation.session_id
            doomed = asyncio.create_task(run_turn(conversation, "m1", "m1"))
            await sim.wait_for(lambda r: r.tokens_sent >= 3)
            first.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await first.proc.wait()
            doomed.cancel()
        sim.config = SimConfig()
        second = await start_server_process(env)
        async with ChatClient(second.target) as client:
            resumed = await client.conversation(session_id)
            events = await _until_terminal(resumed, "m1", "m1")
            recovered = time.monotonic() - killed_at
            assert kinds(events)[0] == "turn_started", kinds(events)
            assert not events[0].turn_started.replayed
            assert kinds(events)[-1] == "done", events[-1]
            assert recovered < 10, f"the session stayed locked {recovered:.1f}s after the kill"
            answer = text_of(events)
            assert await _history(client, session_id) == [("user", "m1"), ("assistant", answer)]
            record = _record(redis_proc, session_id, "m1")
            assert record is not None
            assert record["status"] == "done"
            # Sent once more, it replays: the model is not asked again.
            asked = len(sim.requests)
            again = await _until_terminal(resumed, "m1", "m1")
            assert again[0].turn_started.replayed
            assert text_of(again) == answer
            assert len(sim.requests) == asked
            assert "inflight" not in _meta(redis_proc, session_id)
    finally:
        for server in (first, second):
            if server is not None and server.proc.returncode is None:
                server.proc.kill()
                await server.proc.wait()


async def test_an_orphaned_turn_is_failed_by_the_next_message_and_its_retry_is_stored_once(
    redis_proc: RedisProcess, redis_url: str, sim: UpstreamSim
) -> None:
    settings = make_settings(redis_url, sim.base_url, engine__turn_lease=0.5)
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            sid = conversation.session_id
            # What an instance that died mid-turn leaves behind: m1 stored, its
            # turn running, the lease held and never renewed.
            orphan = await app.store.begin_turn(
                "default", sid, "m1", "m1", 7, attempt="crashed-instance"
            )
            assert orphan.status == "started"
            await asyncio.sleep(0.6)
            second = await _until_terminal(conversation, "m2", "m2")
            assert kinds(second)[-1] == "done", second[-1]
            record = _record(redis_proc, sid, "m1")
            assert record is not None
            assert (record["status"], record["finish_reason"]) == ("failed", "TURN_ORPHANED")
            # "A message whose earlier turn failed runs again", once stored.
            retried = await _until_terminal(conversation, "m1", "m1")
            assert kinds(retried)[-1] == "done"
            assert not retried[0].turn_started.replayed
            assert await _history(client, sid) == [
                ("user", "m1"),
                ("user", "m2"),
                ("assistant", text_of(second)),
                ("assistant", text_of(retried)),
            ]
            # The retry's prompt holds m1 once: as the new message, not in the history too.
            prompt = [m["content"] for m in sim.requests[-1].body["messages"]]
            assert prompt.count("m1") == 1
    finally:
        await app.shutdown(grace=0)


async def test_a_running_turn_keeps_its_lease_and_a_resend_joins_it(
    redis_proc: RedisProcess, redis_url: str, sim: UpstreamSim
) -> None:
    """A turn longer than its lease keeps the session (renewed), on any instance."""
    sim.config = SimConfig(tokens_per_second=20, answer_tokens=30)  # 1.5 s, lease 0.4 s
    settings = make_settings(redis_url, sim.base_url, engine__turn_lease=0.4)
    one = await KoreroServer.start(settings)
    two = await KoreroServer.start(settings)
    try:
        async with (
            ChatClient(f"127.0.0.1:{one.port}") as a,
            ChatClient(f"127.0.0.1:{two.port}") as b,
        ):
            first = await a.conversation()
            running = asyncio.create_task(_until_terminal(first, "long one", "L1"))
            await sim.wait_for(lambda r: r.tokens_sent >= 1)
            await asyncio.sleep(1.0)  # well past the lease: renewed, not orphaned
            other = await b.conversation(first.session_id)
            busy = await _until_terminal(other, "meanwhile", "L2")
            assert busy[-1].error.reason == "TURN_IN_FLIGHT"
            joined = await _until_terminal(other, "long one", "L1")  # followed, then replayed
            events = await running
            assert kinds(events)[-1] == "done"
            assert joined[0].turn_started.replayed
            assert text_of(joined) == text_of(events)
            assert len(sim.requests) == 1
            assert await _history(a, first.session_id) == [
                ("user", "long one"),
                ("assistant", text_of(events)),
            ]
    finally:
        await one.shutdown(grace=0)
        await two.shutdown(grace=0)


# 2. Redis paused: outcomes resolved before the client is told -----------------------


@pytest.fixture
async def paused_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    redis = RedisProcess(tmp_path)
    redis.start()
    yield redis
    redis.resume()
    redis.stop()


_STREAMS = 5


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["begin", "answer", "finish"])
async def test_a_paused_redis_leaves_records_that_match_what_clients_were_told(
    paused_redis: RedisProcess, sim: UpstreamSim, phase: str
) -> None:
    # Rate limits off: the begin is then the first Redis call of a turn.
    settings = make_settings(paused_redis.url, sim.base_url, limits__enabled=False)
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            warm = await client.conversation()
            assert kinds(await run_turn(warm, "warm the script cache", "w"))[-1] == "done"
            conversations = [await client.conversation() for _ in range(_STREAMS)]
            if phase == "begin":
                paused_redis.pause()
            elif phase == "answer":  # paused mid-answer, back before it ends
                sim.config = SimConfig(tokens_per_second=10, answer_tokens=40)  # 4 s
            else:  # paused just before the answers end, back well after
                sim.config = SimConfig(tokens_per_second=10, answer_tokens=15)  # 1.5 s
            turns = [
                asyncio.create_task(_until_terminal(c, f"question {i}", f"q{i}"))
                for i, c in enumerate(conversations)
            ]
            if phase != "begin":
                await sim.wait_for(lambda r: r.tokens_sent >= 5, timeout=10)
                await asyncio.sleep(0.3 if phase == "answer" else 0.7)
                paused_redis.pause()
            await asyncio.sleep(3.0)
            paused_redis.resume()
            results = await asyncio.gather(*turns)
            sim.config = SimConfig()

            for i, (conversation, events) in enumerate(zip(conversations, results, strict=True)):
                sid, cmid = conversation.session_id, f"q{i}"
                assert len(terminals(events)) == 1, kinds(events)
                told = events[-1]
                record = _record(paused_redis, sid, cmid)
                history = await _history(client, sid)
                assert "inflight" not in _meta(paused_redis, sid), f"{cmid}: a lock was left"
                if told.WhichOneof("kind") == "done":
                    assert record is not None
                    assert record["status"] == "done", record
                    assert history == [("user", f"question {i}"), ("assistant", text_of(events))]
                else:
                    assert told.error.reason == "STORE_UNAVAILABLE", told
                    assert told.error.retryable
                    assert record is None or record["status"] == "failed", record
                    assert history in ([], [("user", f"question {i}")]), history
                if phase != "begin":
                    assert told.WhichOneof("kind") == "done", (phase, told)

            # Sent again: an answered message replays (no second model call, no
            # second copy); a failed one runs now and is stored once.
            for i, conversation in enumerate(conversations):
                asked = len(sim.requests)
                again = await _until_terminal(conversation, f"question {i}", f"q{i}")
                assert kinds(again)[-1] == "done", again[-1]
                was_done = results[i][-1].WhichOneof("kind") == "done"
                assert again[0].turn_started.replayed == was_done
                assert len(sim.requests) == asked + (0 if was_done else 1)
                history = await _history(client, conversation.session_id)
                assert history == [("user", f"question {i}"), ("assistant", text_of(again))]
    finally:
        paused_redis.resume()
        await app.shutdown(grace=0)


async def test_a_turn_whose_lease_was_taken_over_ends_with_turn_lease_lost(
    redis_proc: RedisProcess, redis_url: str, sim: UpstreamSim
) -> None:
    """What a stalled instance meets when it wakes: its session moved on without it."""
    sim.config = SimConfig(tokens_per_second=20, answer_tokens=40)  # 2 s, lease 0.3 s
    settings = make_settings(redis_url, sim.base_url, engine__turn_lease=0.3)
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            first = await client.conversation()
            sid = first.session_id
            stalled = asyncio.create_task(_until_terminal(first, "slow one", "L1"))
            await sim.wait_for(lambda r: r.tokens_sent >= 1)
            # As if its renewals had stopped long enough for another message to take over.
            redis_proc.client().hdel(f"kr:{{default:{sid}}}:meta", "inflight", "inflight_until")
            other = await client.conversation(sid)
            taken = await _until_terminal(other, "meanwhile", "L2")
            assert kinds(taken)[-1] == "done"
            events = await stalled
            assert events[-1].error.reason == "TURN_LEASE_LOST", events[-1]
            assert events[-1].error.retryable
            record = _record(redis_proc, sid, "L1")
            assert record is not None
            assert record["status"] == "failed"
            assert await _history(client, sid) == [
                ("user", "slow one"),
                ("user", "meanwhile"),
                ("assistant", text_of(taken)),
            ]
            await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=3)
    finally:
        await app.shutdown(grace=0)

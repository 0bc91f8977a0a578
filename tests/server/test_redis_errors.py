"""Redis answering with an error (not a dropped connection): a typed event, the stream lives.

Every component talks to Redis through `storage/boundary.py`; a `ResponseError`
from any of them (here: the rate limiter's script and the session store's
begin-turn script) must reach the client as an `error` event with a canonical
code and reason, and the next message on the same stream must be answered.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.sim import UpstreamSim
from korero.testing import PrivateRedis
from tests.conftest import make_settings
from tests.helpers import kinds, run_turn, text_of


@pytest.fixture
def small_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    with PrivateRedis(tmp_path, args=("--maxmemory-policy", "noeviction")) as redis:
        yield redis  # type: ignore[misc]


async def test_out_of_memory_is_a_typed_error_event_and_the_stream_lives_on(
    small_redis: PrivateRedis, sim: UpstreamSim
) -> None:
    app = await KoreroServer.start(make_settings(small_redis.url, sim.base_url))
    admin = small_redis.client()
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            assert kinds(await run_turn(conversation, "hello", "m1"))[-1] == "done"
            # Fill Redis past a 1 MB cap: every write script now gets "OOM command not allowed".
            admin.set("filler", b"x" * 2_000_000)
            admin.config_set("maxmemory", "1mb")
            began = time.monotonic()
            refused = await run_turn(conversation, "are you there?", "m2")
            # An error reply means the script did not run: nothing to resolve, no waiting
            # out KORERO_STORE_RESOLVE_SECONDS as for a reply that never came.
            assert time.monotonic() - began < 3
            assert kinds(refused) == ["error"]
            error = refused[0].error
            assert (error.reason, error.retryable) == ("STORE_UNAVAILABLE", True)
            assert error.client_message_id == "m2"
            # Nothing of m2 was stored; once Redis has room the same stream answers.
            admin.config_set("maxmemory", "0")
            admin.delete("filler")
            events = await run_turn(conversation, "are you there?", "m2")
            assert kinds(events)[-1] == "done"
            assert text_of(events)
            history = await client.list_messages(conversation.session_id)
            assert [m.client_message_id for m in history.messages if m.client_message_id] == [
                "m1",
                "m2",
            ]
    finally:
        admin.close()
        await app.shutdown(grace=0)


async def test_a_wrong_type_reply_from_the_limiter_is_a_typed_error_event(
    small_redis: PrivateRedis, sim: UpstreamSim
) -> None:
    app = await KoreroServer.start(make_settings(small_redis.url, sim.base_url))
    admin = small_redis.client()
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            assert kinds(await run_turn(conversation, "hello", "m1"))[-1] == "done"
            # A tenant bucket that is not a hash: the limiter script fails with WRONGTYPE.
            admin.delete("kr:{default}:rl:tokens")
            admin.set("kr:{default}:rl:tokens", "not a bucket")
            refused = await run_turn(conversation, "still there?", "m2")
            assert kinds(refused) == ["error"]
            assert refused[0].error.reason == "STORE_ERROR"
            assert "ResponseError" in refused[0].error.message
            admin.delete("kr:{default}:rl:tokens")
            assert kinds(await run_turn(conversation, "still there?", "m2"))[-1] == "done"
    finally:
        admin.close()
        await app.shutdown(grace=0)

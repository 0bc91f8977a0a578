"""CRM webhooks: signed, ordered, exactly once under retries, dead letters, never in the way."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from aiohttp import web

from korero.client import ChatClient
from korero.server.handoff.webhooks import dead_letters, retry_dead_letters, sign, verify
from korero.server.settings import Settings, WebhookSettings, WebhookTarget
from korero.testing import free_port
from tests.handoff.desk import Agent, handed_over
from tests.handoff.receiver import Receiver
from tests.helpers import redis_client, run_turn

SCHEMA = json.loads(
    (
        Path(__file__).resolve().parents[2] / "docs" / "schemas" / "handoff-webhook.schema.json"
    ).read_text()
)
SECRET = "whsec_test"


def _webhooks(receiver: Receiver, **overrides: object) -> WebhookSettings:
    base = WebhookSettings(
        targets={"default": (WebhookTarget(receiver.url, SECRET),)},
        max_attempts=6,
        backoff=0.05,
        backoff_max=0.2,
        timeout=1.0,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


async def _until(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.05)


async def _full_handoff(target: str, *, close: bool = True) -> str:
    agent = Agent(target, "a1", "Mere")
    await agent.connect()
    async with ChatClient(target) as client:
        _, handoff_id = await handed_over(client, agent)
        await agent.release(handoff_id, close=close, disposition="resolved")
        await agent.expect("ended")
    await agent.close()
    return handoff_id


def test_signature_round_trip() -> None:
    body = b'{"id":"evt_1"}'
    header = sign(SECRET, 1_700_000_000, body)
    assert verify(SECRET, header, body, now=1_700_000_010)
    assert not verify(SECRET, header, body + b" ", now=1_700_000_010)
    assert not verify("other", header, body, now=1_700_000_010)
    assert not verify(SECRET, header, body, now=1_700_000_000 + 3600)  # replayed later


async def test_events_signed_in_order_exactly_once_despite_failing_first_attempts(
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    receiver = Receiver(SECRET, fail_first=2, drop_after_processing=True)
    await receiver.start()
    try:
        app = await start_server(webhooks=_webhooks(receiver))
        handoff_id = await _full_handoff(f"127.0.0.1:{app.port}")
        await _until(lambda: len(receiver.processed) == 3 and sum(receiver.attempts.values()) >= 12)
        await asyncio.sleep(0.3)  # nothing more arrives
        assert receiver.rejected == []
        assert [e["type"] for e in receiver.processed] == [
            "handoff.requested",
            "handoff.agent_joined",
            "handoff.closed",
        ]
        assert [e["sequence"] for e in receiver.processed] == [1, 2, 3]
        for event in receiver.processed:
            jsonschema.validate(event, SCHEMA)
            assert event["handoff"]["id"] == handoff_id
            # 2 refused + 1 processed-but-lost + 1 acknowledged retry
            assert receiver.attempts[event["id"]] == 4
        closed = receiver.processed[-1]["handoff"]
        assert closed["outcome"] == "closed"
        assert closed["disposition"] == "resolved"
        assert closed["agent"]["display_name"] == "Mere"
        assert receiver.processed[1]["handoff"]["waited_seconds"] >= 0
    finally:
        await receiver.stop()


async def test_dead_letters_after_max_attempts_and_retry(start_server, redis_url) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(SECRET, always_fail=True)
    await receiver.start()
    settings = _webhooks(receiver, max_attempts=3)
    try:
        app = await start_server(webhooks=settings)
        await _full_handoff(f"127.0.0.1:{app.port}", close=False)
        client = redis_client(redis_url)
        try:
            await _until(lambda: sum(receiver.attempts.values()) >= 9)
            letters: list = []
            for _ in range(100):
                letters = await dead_letters(client, settings)
                if len(letters) == 3:
                    break
                await asyncio.sleep(0.05)
            assert [d.event_type for d in letters] == [
                "handoff.requested",
                "handoff.agent_joined",
                "handoff.closed",
            ]
            assert all(d.attempts == 3 for d in letters)
            assert letters[0].last_error == "HTTP 500"
            assert receiver.processed == []
            receiver.always_fail = False
            assert await retry_dead_letters(client, settings, "default") == 3
            await _until(lambda: len(receiver.processed) == 3)
            assert [e["sequence"] for e in receiver.processed] == [1, 2, 3]
            assert await dead_letters(client, settings) == []
        finally:
            await client.aclose()
    finally:
        await receiver.stop()


async def _korero(redis_url: str, settings: WebhookSettings, *args: str) -> tuple[int, str]:
    """Run the real `korero` command, configured the way an operator's shell would be."""
    targets = {
        tenant: [{"url": t.url, "secret": t.secret} for t in endpoints]
        for tenant, endpoints in settings.targets.items()
    }
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "KORERO_WEBHOOKS": json.dumps(targets),
        "KORERO_WEBHOOK_MAX_ATTEMPTS": str(settings.max_attempts),
    }
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "korero"),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return int(proc.returncode or 0), out.decode()


def _dead_in(listing: str) -> dict[str, str]:
    """`korero webhooks list`'s dead letters: event id -> event type."""
    dead = {}
    for line in listing.splitlines():
        words = line.split()
        if words and words[0].startswith("evt_"):
            dead[words[0]] = words[1]
    return dead


@pytest.mark.slow  # spawns `korero webhooks` several times
async def test_webhooks_command_lists_dead_letters_and_retries_one_by_id(
    start_server, redis_url
) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(SECRET, always_fail=True)
    await receiver.start()
    settings = _webhooks(receiver, max_attempts=3)
    try:
        app = await start_server(webhooks=settings)
        await _full_handoff(f"127.0.0.1:{app.port}", close=True)
        await _until(lambda: sum(receiver.attempts.values()) >= 9)
        dead: dict[str, str] = {}
        for _ in range(100):
            code, listing = await _korero(redis_url, settings, "webhooks", "list")
            assert code == 0, listing
            dead = _dead_in(listing)
            if len(dead) == 3:
                break
            await asyncio.sleep(0.1)
        assert "dead letters: 3" in listing
        assert sorted(dead.values()) == [
            "handoff.agent_joined",
            "handoff.closed",
            "handoff.requested",
        ]
        assert listing.count("attempts=3") == 3
        assert "last error: HTTP 500" in listing
        assert receiver.url in listing  # the endpoint row
        assert receiver.processed == []

        receiver.always_fail = False
        joined = next(e for e, kind in dead.items() if kind == "handoff.agent_joined")
        code, out = await _korero(redis_url, settings, "webhooks", "retry", joined)
        assert (code, out.strip()) == (0, "1 dead letter queued again")
        await _until(lambda: len(receiver.processed) == 1)
        await asyncio.sleep(0.5)  # nothing else arrives, and that one only once
        assert [e["id"] for e in receiver.processed] == [joined]
        assert receiver.attempts[joined] == 4  # 3 failed, then the retry
        assert all(receiver.attempts[e] == 3 for e in dead if e != joined)
        code, listing = await _korero(redis_url, settings, "webhooks", "list")
        assert "dead letters: 2" in listing
        assert set(_dead_in(listing)) == set(dead) - {joined}

        code, out = await _korero(redis_url, settings, "webhooks", "retry", joined)
        assert (code, out.strip()) == (1, "0 dead letters queued again")  # not dead any more
        code, out = await _korero(redis_url, settings, "webhooks", "retry", "evt_unknown")
        assert (code, out.strip()) == (1, "0 dead letters queued again")
        await asyncio.sleep(0.3)
        assert receiver.attempts[joined] == 4

        code, out = await _korero(redis_url, settings, "webhooks", "retry")
        assert (code, out.strip()) == (0, "2 dead letters queued again")
        await _until(lambda: len(receiver.processed) == 3)
        await asyncio.sleep(0.3)
        assert sorted(e["id"] for e in receiver.processed) == sorted(dead)
        assert receiver.rejected == []
        code, listing = await _korero(redis_url, settings, "webhooks", "list")
        assert "dead letters: 0" in listing
    finally:
        await receiver.stop()


async def test_a_hanging_receiver_never_slows_the_chat(start_server) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    seen = asyncio.Event()
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        seen.set()
        await release.wait()
        return web.Response(status=204)

    api = web.Application()
    api.router.add_post("/hook", hang)
    runner = web.AppRunner(api)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        settings = WebhookSettings(
            targets={"default": (WebhookTarget(f"http://127.0.0.1:{port}/hook", SECRET),)},
            timeout=10.0,
        )
        app = await start_server(webhooks=settings)
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            await run_turn(conversation, "I want to talk to a real person")
            await asyncio.wait_for(seen.wait(), 5)  # the delivery is stuck in the receiver
            started = time.monotonic()
            relayed = await run_turn(conversation, "hello?")
            assert relayed[-1].WhichOneof("kind") == "message_relayed"
            assert time.monotonic() - started < 1.0
    finally:
        release.set()
        await runner.cleanup()


def test_webhook_settings_parse() -> None:
    settings = Settings.from_env(
        {"KORERO_WEBHOOKS": json.dumps({"t1": [{"url": "https://crm.example/h", "secret": "s"}]})}
    )
    (target,) = settings.webhooks.targets["t1"]
    assert target.url == "https://crm.example/h"
    assert len(target.target_id) == 12
    with pytest.raises(ValueError, match="url"):
        Settings.from_env({"KORERO_WEBHOOKS": json.dumps({"t1": [{"secret": "s"}]})})

"""A customer leaves the queue before an agent joins: the handoff ends `abandoned`.

The customer's withdrawal (`RequestHandoff.withdraw`, `korero chat`'s `/bot`) and
DeleteSession of a session waiting in the queue; each seen by the customer, the
agent desk, the CRM webhook and `korero report`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.report.queries import build_report, parse_since, render
from korero.server.settings import PostgresSettings, WebhookSettings, WebhookTarget
from korero.server.storage.migrate import migrate
from tests.handoff.desk import Agent, handed_over, notification
from tests.handoff.receiver import Receiver
from tests.handoff.test_report import pg_server, pg_url  # noqa: F401 - fixtures
from tests.handoff.test_webhooks import SCHEMA, SECRET
from tests.helpers import kinds, run_turn, text_of

KORERO = str(Path(sys.executable).parent / "korero")


async def _until(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.05)


def _webhooks(receiver: Receiver) -> WebhookSettings:
    return WebhookSettings(
        targets={"default": (WebhookTarget(receiver.url, SECRET),)},
        max_attempts=6,
        backoff=0.05,
        backoff_max=0.2,
        timeout=1.0,
    )


async def _durable_desk(start_server, url: str) -> tuple[Any, Receiver, Agent]:  # type: ignore[no-untyped-def]
    """A server with PostgreSQL and a webhook receiver, and an agent connected to it."""
    await migrate(url)
    receiver = Receiver(SECRET)
    await receiver.start()
    app = await start_server(postgres=PostgresSettings(url=url), webhooks=_webhooks(receiver))
    agent = Agent(f"127.0.0.1:{app.port}", "a1", "Mere")
    await agent.connect()
    return app, receiver, agent


async def test_a_customer_who_leaves_the_queue_is_abandoned_and_the_bot_answers_again(
    pg_url: str,  # noqa: F811 - the fixture
    start_server,  # type: ignore[no-untyped-def]
    sim,  # type: ignore[no-untyped-def]
) -> None:
    app, receiver, agent = await _durable_desk(start_server, pg_url)
    target = f"127.0.0.1:{app.port}"
    try:
        async with ChatClient(target) as client:
            conversation = await client.conversation()
            await run_turn(conversation, "I want to talk to a real person")
            queued = await notification(conversation, "handoff_queued")
            handoff_id = queued.handoff_queued.handoff_id
            await agent.expect("offered")  # offered to Mere, not yet accepted
            await agent.expect("queue")

            await conversation.withdraw_handoff()
            ended = await notification(conversation, "handoff_ended")
            assert ended.handoff_ended.handoff_id == handoff_id
            assert ended.handoff_ended.outcome == pb.HANDOFF_OUTCOME_ABANDONED
            assert "virtual assistant" in ended.handoff_ended.message
            assert ended.seq > queued.seq

            # the desk: the offer is withdrawn and the queue no longer shows it
            withdrawn = await agent.expect("offer_withdrawn", handoff_id=handoff_id)
            assert withdrawn.offer_withdrawn.reason == "abandoned"

            async def left_queue() -> None:
                while True:
                    seen = agent.of_kind("queue")
                    if seen and not seen[-1].conversations:
                        return
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(left_queue(), 10)
            assert await app.handoff.store.open_handoff("default", conversation.session_id) is None

            # the bot answers again (the model is asked)
            before = len(sim.requests)
            events = await run_turn(conversation, "What is the checked baggage allowance?")
            assert kinds(events)[0] == "turn_started"
            assert kinds(events)[-1] == "done"
            assert text_of(events)
            assert len(sim.requests) > before

            # nothing waits any more: a second withdrawal is refused
            await conversation.withdraw_handoff()
            events = await run_turn(conversation, "thanks")
            errors = [e.error.reason for e in events if e.WhichOneof("kind") == "error"]
            assert errors[0] == "HANDOFF_NOT_WAITING"
            await conversation.close()

        # the CRM: handoff.closed with outcome abandoned
        await _until(lambda: len(receiver.processed) == 2)
        assert [e["type"] for e in receiver.processed] == ["handoff.requested", "handoff.closed"]
        for event in receiver.processed:
            jsonschema.validate(event, SCHEMA)
        closed = receiver.processed[-1]["handoff"]
        assert closed["id"] == handoff_id
        assert closed["outcome"] == "abandoned"
        assert closed["waited_seconds"] >= 0
        assert "agent" not in closed

        # the report: not contained, counted as abandoned
        assert app.recorder is not None
        await app.recorder.flush()
        conn = await asyncpg.connect(pg_url)
        try:
            row = await conn.fetchrow(
                "SELECT outcome, ended_at, joined_at FROM handoffs WHERE handoff_id = $1",
                handoff_id,
            )
            report = await build_report(conn, "default", parse_since("1h"))
        finally:
            await conn.close()
        assert row is not None
        assert row["outcome"] == "abandoned"
        assert row["ended_at"] is not None
        assert row["joined_at"] is None
        assert report.conversations == 1
        assert report.contained == 0
        assert report.abandoned == 1
        assert "abandoned in the queue" in render(report)
        proc = await asyncio.create_subprocess_exec(
            KORERO, "report", "--since", "1h", "--json", "--url", pg_url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        shown = json.loads(out)
        assert shown["abandoned"] == 1
        assert shown["containment_rate"] == 0.0
    finally:
        await agent.close()
        await receiver.stop()


async def test_an_agent_who_joined_keeps_the_conversation_when_the_customer_withdraws(
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    agent = Agent(target, "a1", "Mere")
    await agent.connect()
    try:
        async with ChatClient(target) as client:
            conversation, _ = await handed_over(client, agent)
            await notification(conversation, "agent_joined")
            await conversation.withdraw_handoff()
            events = await run_turn(conversation, "still there?")
            errors = [e.error.reason for e in events if e.WhichOneof("kind") == "error"]
            assert errors[0] == "HANDOFF_ALREADY_JOINED"
            record = await app.handoff.store.open_handoff("default", conversation.session_id)
            assert record is not None
            assert record.state == "active"
            await conversation.close()
    finally:
        await agent.close()


async def test_deleting_a_session_waiting_in_the_queue_abandons_its_handoff(
    pg_url: str,  # noqa: F811 - the fixture
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    app, receiver, agent = await _durable_desk(start_server, pg_url)
    target = f"127.0.0.1:{app.port}"
    try:
        async with ChatClient(target) as client:
            conversation = await client.conversation()
            await run_turn(conversation, "I want to talk to a real person")
            handoff_id = (await agent.expect("offered")).offered.context.handoff_id
            await conversation.close()
            await client.stub.DeleteSession(
                pb.DeleteSessionRequest(session_id=conversation.session_id)
            )
        withdrawn = await agent.expect("offer_withdrawn", handoff_id=handoff_id)
        assert withdrawn.offer_withdrawn.reason == "abandoned"
        snapshot = await app.handoff.store.snapshot("default")
        assert snapshot.by_id(handoff_id) is None
        assert list(snapshot.queued()) == []
        await _until(lambda: len(receiver.processed) == 2)
        closed = receiver.processed[-1]
        assert closed["type"] == "handoff.closed"
        jsonschema.validate(closed, SCHEMA)
        assert closed["handoff"]["outcome"] == "abandoned"
        assert closed["handoff"]["disposition"] == "session_deleted"
        # and PostgreSQL keeps no trace of it, even after the recorder's next flush
        assert app.recorder is not None
        await app.recorder.flush()
        conn = await asyncpg.connect(pg_url)
        try:
            for table in ("sessions", "handoffs", "handoff_messages"):
                found = await conn.fetchval(
                    f"SELECT count(*) FROM {table} WHERE session_id = $1",  # noqa: S608
                    conversation.session_id,
                )
                assert found == 0, table
        finally:
            await conn.close()
    finally:
        await agent.close()
        await receiver.stop()

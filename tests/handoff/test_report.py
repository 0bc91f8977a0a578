"""`korero report` over PostgreSQL: what the recorder wrote, figure by figure."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.report.queries import build_report, parse_since, render
from korero.server.settings import DEFAULT_POSTGRES_URL, PostgresSettings
from korero.server.storage.history import OutboxBatch
from korero.server.storage.migrate import migrate
from korero.server.storage.outbox import add_entry
from korero.testing import free_port
from tests.handoff.desk import Agent, handed_over
from tests.helpers import ingest_sample, run_turn
from tests.pg import wait_until

KORERO = str(Path(sys.executable).parent / "korero")
ADMIN = DEFAULT_POSTGRES_URL.rsplit("/", 1)[0] + "/postgres"


def _reachable(url: str) -> bool:
    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's PostgreSQL (127.0.0.1:5432), or a private cluster when none answers.

    initdb refuses to run as root, so a private cluster runs as `postgres` in a
    directory that user owns (see the design notes).
    """
    if _reachable(ADMIN):
        yield DEFAULT_POSTGRES_URL.rsplit("/", 1)[0]
        return
    bindir = next(Path("/usr/lib/postgresql").glob("*/bin"))
    data = tmp_path_factory.mktemp("pg")
    shutil.chown(data, "postgres")
    port = free_port()
    run = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(data / "server.log"),  # the server must not hold our pipes open
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*run, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )


@pytest.fixture
async def pg_url(pg_server: str) -> AsyncIterator[str]:
    """A fresh database, dropped afterwards."""
    name = f"korero_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(f"{pg_server}/postgres", timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield f"{pg_server}/{name}"
    admin = await asyncpg.connect(f"{pg_server}/postgres", timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _korero(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        KORERO, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()


def test_since_parses_units() -> None:
    assert parse_since("7d") == timedelta(days=7)
    assert parse_since("24h") == timedelta(hours=24)
    with pytest.raises(ValueError, match="unit"):
        parse_since("a week")


@pytest.mark.slow
async def test_db_migrate_applies_the_handoff_tables_once(pg_url: str) -> None:
    code, out, err = await _korero("db", "migrate", "--url", pg_url)
    assert code == 0, err
    assert "applied 0001_history" in out
    assert "applied 0002_handoffs" in out
    code, out, _ = await _korero("db", "migrate", "--url", pg_url)
    assert "schema is up to date" in out


async def test_report_counts_containment_handoffs_waits_ttft_cache_and_intents(
    pg_url: str,
    redis_url: str,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    await migrate(pg_url)
    await ingest_sample(redis_url)
    app = await start_server(postgres=PostgresSettings(url=pg_url))
    target = f"127.0.0.1:{app.port}"
    agent = Agent(target, "a1", "Mere", skills=["complaints"])
    await agent.connect()
    async with ChatClient(target) as client:
        contained = await client.conversation()  # the bot answers; cached the second time
        await run_turn(contained, "How many bags can I check?")
        again = await client.conversation()
        repeat = await run_turn(again, "How many bags can I check?")
        assert repeat[-1].done.cached
        complaint = await client.conversation()
        await run_turn(complaint, "Your service is terrible and the staff were rude")
        handoff_id = (await agent.expect("offered")).offered.context.handoff_id
        await asyncio.sleep(0.3)  # the customer waits a little
        await agent.accept(handoff_id)
        await agent.expect("assigned")
        await agent.release(handoff_id, close=True, disposition="apology-sent")
        await agent.expect("ended")
        waiting = await client.conversation()  # asks for a person; nobody joins
        await run_turn(waiting, "I want to talk to a real person")
    await agent.close()
    assert app.recorder is not None
    for _ in range(50):  # the recorder writes every half second
        await app.recorder.flush()
        conn = await asyncpg.connect(pg_url)
        try:
            ended = await conn.fetchval("SELECT count(*) FROM handoffs WHERE ended_at IS NOT NULL")
            report = await build_report(conn, "default", timedelta(hours=1))
        finally:
            await conn.close()
        if ended == 1 and report.handoffs == 2 and report.conversations == 4:
            break
        await asyncio.sleep(0.1)
    assert report.conversations == 4
    assert report.contained == 2
    assert report.containment_rate == 0.5
    assert report.handoffs_by_trigger == {"complaint": 1, "human_request": 1}
    assert report.handoff_rate_by_trigger == {"complaint": 0.25, "human_request": 0.25}
    assert report.agent_joined == 1
    assert report.median_agent_wait_seconds is not None
    assert report.median_agent_wait_seconds >= 0.3
    assert report.turns == 2  # the bot's answers; the two hand-over notices are not counted
    assert report.p95_time_to_first_token_ms is not None
    assert report.cached_answers == 1
    assert report.cache_hit_rate == 0.5
    assert report.tokens_saved_estimate > 0
    assert dict(report.top_intents) == {"policy_question": 2, "complaint": 1, "human_request": 1}
    table = render(report)
    assert "contained (no person)" in table
    assert "complaint" in table

    code, out, err = await _korero(
        "report", "--tenant", "default", "--since", "1h", "--json", "--url", pg_url
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["containment_rate"] == 0.5
    assert shown["handoffs_by_trigger"] == {"complaint": 1, "human_request": 1}
    assert {"intent": "policy_question", "turns": 2} in shown["top_intents"]
    code, out, err = await _korero("report", "--since", "1h", "--url", pg_url)
    assert code == 0, err
    assert "median wait for an agent" in out


async def test_handoff_messages_are_recorded_and_a_resumed_stream_replays_handoff_events(
    pg_url: str,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    await migrate(pg_url)
    app = await start_server(postgres=PostgresSettings(url=pg_url))
    target = f"127.0.0.1:{app.port}"
    agent = Agent(target, "a1", "Mere")
    await agent.connect()
    async with ChatClient(target) as client:
        conversation = await client.conversation()
        await run_turn(conversation, "I want to talk to a real person")
        cursor = conversation.last_seq  # the escalating turn's `done`
        handoff_id = (await agent.expect("offered")).offered.context.handoff_id
        await agent.accept(handoff_id)
        await agent.expect("assigned")
        await agent.say(handoff_id, "Kia ora, Mere here.")
        await agent.expect("message_sent")
        await run_turn(conversation, "hello Mere")
        await conversation.close()
        # A stream resumed from the cursor gets what it missed, handoff events included.
        again = await client.conversation(conversation.session_id, after_seq=cursor)
        kinds = []
        while "agent_message" not in kinds:
            kinds.append((await again.next_notification(10)).WhichOneof("kind"))
        assert kinds[kinds.index("agent_joined") :] == ["agent_joined", "agent_message"]
        await again.close()
    await agent.close()
    assert app.recorder is not None
    rows: list[asyncpg.Record] = []
    for _ in range(50):
        await app.recorder.flush()
        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch("SELECT role, author, text FROM handoff_messages ORDER BY seq")
        finally:
            await conn.close()
        if len(rows) == 2:
            break
        await asyncio.sleep(0.1)
    assert [(r["role"], r["author"], r["text"]) for r in rows] == [
        ("agent", "Mere", "Kia ora, Mere here."),
        ("customer", "", "hello Mere"),
    ]


async def test_handoff_messages_reach_postgresql_through_the_outbox_not_the_recorder(
    pg_url: str,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    """Customer and agent messages are in `handoff_messages` once the session outbox
    drains, with the recorder dead from the start (a process that dies before the
    recorder's flush); DeleteSession removes them and a late outbox write of one
    cannot bring it back."""
    await migrate(pg_url)
    app = await start_server(postgres=PostgresSettings(url=pg_url))
    assert app.recorder is not None
    assert app.recorder._task is not None
    app.recorder._task.cancel()  # it never flushes: only the outbox can write the rows
    target = f"127.0.0.1:{app.port}"
    agent = Agent(target, "a1", "Mere")
    await agent.connect()
    pg = await asyncpg.connect(pg_url)
    try:
        async with ChatClient(target) as client:
            conversation, handoff_id = await handed_over(client, agent)
            await agent.say(handoff_id, "Kia ora, Mere here.", "m-1")
            await agent.expect("message_sent")
            await run_turn(conversation, "my bag is lost", "c-1")
            await agent.say(handoff_id, "Found it.", "m-2")
            await agent.expect("message_sent")
            session_id = conversation.session_id

            async def rows() -> list[asyncpg.Record]:
                return await pg.fetch(
                    "SELECT tenant, seq, handoff_id, role, author, client_message_id, text"
                    " FROM handoff_messages WHERE session_id = $1 ORDER BY seq",
                    session_id,
                )

            async def three() -> bool:
                return len(await rows()) == 3

            await wait_until(three, 10)
            found = await rows()
            assert [
                (r["tenant"], r["handoff_id"], r["role"], r["author"], r["client_message_id"])
                for r in found
            ] == [
                ("default", handoff_id, "agent", "Mere", "m-1"),
                ("default", handoff_id, "customer", "", "c-1"),
                ("default", handoff_id, "agent", "Mere", "m-2"),
            ]
            assert [r["text"] for r in found] == [
                "Kia ora, Mere here.",
                "my bag is lost",
                "Found it.",
            ]
            seqs = [r["seq"] for r in found]
            assert seqs == sorted(seqs)
            assert len(set(seqs)) == 3
            assert not any("handoff_messages" in row.sql for row in app.recorder._pending)
            # Applied again (a sweep repeated after a crash): nothing doubles.
            again = OutboxBatch()
            entry = {"k": "h", "seq": seqs[1], "hid": handoff_id, "role": "customer",
                     "cmid": "c-1", "text": "my bag is lost", "ts": 1}  # fmt: skip
            add_entry(again, "default", session_id, "1-1", json.dumps(entry).encode())
            assert app.history is not None
            await app.history.apply(again)
            assert len(await rows()) == 3
            await conversation.close()
            await client.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id))
            assert await rows() == []
            await app.history.apply(again)  # a write read before the deletion: refused
            assert await rows() == []
    finally:
        await pg.close()
        await agent.close()

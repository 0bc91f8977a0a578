"""PostgreSQL as the system of record: turns reach it, tenants stay apart, a session
lost from Redis comes back whole, history pages beyond the Redis window, and
deletion removes a session everywhere."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, ChatError
from korero.server.app import CHAT_SERVICE, HISTORY_HEALTH, KoreroServer
from korero.server.settings import Settings
from korero.server.storage.history import OutboxBatch
from korero.server.storage.migrate import ensure_database, migrate
from korero.server.storage.outbox import add_entry
from korero.sim import UpstreamSim
from korero.testing import free_port
from tests.conftest import RedisProcess, make_settings
from tests.helpers import run_turn, text_of
from tests.pg import PostgresProcess, drop_database, fresh_database, wait_until


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    url = asyncio.run(fresh_database())
    yield url
    asyncio.run(drop_database(url))


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_url, timeout=10)
    await _truncate(conn)
    yield conn
    await conn.close()


async def _truncate(conn: asyncpg.Connection) -> None:
    """Empty the tables. TRUNCATE waits for every lock on them, so the wait is bounded:
    once a CI run hung here for 90 s (cause not found; every earlier test's server is
    shut down by then). On a timeout the sessions still in this database are printed
    (pytest shows them if the test fails) and cut, and the test goes on."""
    await conn.execute("SET lock_timeout = '15s'")
    try:
        await conn.execute("TRUNCATE sessions, messages")
    except asyncpg.LockNotAvailableError:
        others = await conn.fetch(
            "SELECT pid, state, application_name, xact_start, left(query, 120) AS query"
            " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        print("TRUNCATE blocked by:", [dict(r) for r in others])
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await conn.execute("TRUNCATE sessions, messages")


def durable_settings(
    redis_url: str, sim: UpstreamSim, pg_url: str, **overrides: object
) -> Settings:
    return make_settings(
        redis_url,
        sim.base_url,
        postgres__url=pg_url,
        postgres__drain_interval=0.05,
        **overrides,
    )


@pytest.fixture
async def durable(
    redis_url: str, sim: UpstreamSim, pg_url: str, pg: asyncpg.Connection
) -> AsyncIterator[KoreroServer]:
    # `done` waits for the PostgreSQL commit up to KORERO_POSTGRES_COMMIT_WAIT (1 s by
    # default, then it goes out and the turn waits in the outbox): on a loaded machine a
    # commit can take longer than that, so here the wait is long enough to be the rule.
    # The fallback has its own tests (PostgreSQL unreachable, killed).
    app = await KoreroServer.start(
        durable_settings(redis_url, sim, pg_url, postgres__commit_wait=10.0)
    )
    yield app
    await app.shutdown(grace=0.5)


async def _rows(pg: asyncpg.Connection, session_id: str) -> list[tuple[str, str, str]]:
    rows = await pg.fetch(
        "SELECT role, text, client_message_id FROM messages WHERE session_id = $1"
        " ORDER BY turn_no, (role = 'assistant')",
        session_id,
    )
    return [(r["role"], r["text"], r["client_message_id"]) for r in rows]


async def test_done_means_the_turn_is_in_postgres(
    durable: KoreroServer, pg: asyncpg.Connection
) -> None:
    async with ChatClient(f"127.0.0.1:{durable.port}") as client:
        conversation = await client.conversation(
            metadata=pb.SessionMetadata(customer_name="Aroha", booking_reference="KR7Q2X")
        )
        events = await run_turn(conversation, "Where is my bag?", "m1")
        # No waiting: `done` is sent after the PostgreSQL commit.
        rows = await _rows(pg, conversation.session_id)
        assert rows == [
            ("user", "Where is my bag?", "m1"),
            ("assistant", text_of(events), "m1"),
        ]
        session = await pg.fetchrow(
            "SELECT tenant, metadata, turn_count, seq_high FROM sessions WHERE session_id = $1",
            conversation.session_id,
        )
        assert session["tenant"] == "default"
        assert '"customer_name": "Aroha"' in session["metadata"]
        assert session["turn_count"] == 1
        assert session["seq_high"] >= events[-1].seq
        answer = await pg.fetchrow(
            "SELECT model, finish_reason, usage, timings FROM messages"
            " WHERE session_id = $1 AND role = 'assistant'",
            conversation.session_id,
        )
        assert answer["finish_reason"] == "stop"
        assert answer["model"]
        assert '"output"' in answer["usage"]
        assert '"time_to_first_token"' in answer["timings"]


async def test_two_tenants_every_row_carries_its_tenant(
    redis_url: str, sim: UpstreamSim, pg_url: str, pg: asyncpg.Connection
) -> None:
    apps = {
        tenant: await KoreroServer.start(
            durable_settings(redis_url, sim, pg_url, engine__tenant=tenant)
        )
        for tenant in ("t1", "t2")
    }
    sessions: dict[str, set[str]] = {"t1": set(), "t2": set()}
    try:
        for tenant, app in apps.items():
            async with ChatClient(f"127.0.0.1:{app.port}") as client:
                for n in range(2):
                    conversation = await client.conversation()
                    sessions[tenant].add(conversation.session_id)
                    await run_turn(conversation, f"{tenant} question {n}", f"{tenant}-{n}")
                    await conversation.close()
        # Another tenant's session does not exist for you: not readable, not deletable.
        other = next(iter(sessions["t2"]))
        async with ChatClient(f"127.0.0.1:{apps['t1'].port}") as client:
            for call in (
                client.get_session(other),
                client.list_messages(other),
                client.stub.DeleteSession(pb.DeleteSessionRequest(session_id=other)),
            ):
                with pytest.raises((ChatError, grpc.aio.AioRpcError)) as info:
                    await call
                code = info.value.code
                assert (code() if callable(code) else code) == grpc.StatusCode.NOT_FOUND
    finally:
        for app in apps.values():
            await app.shutdown(grace=0.5)
    # The table walk: every row of every table names its tenant, and each
    # tenant's rows hold only that tenant's sessions and text.
    tables = await pg.fetch(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = 'public' AND table_name <> 'korero_migrations'"
    )
    assert {t["table_name"] for t in tables} == {
        "sessions",
        "messages",
        "session_tombstones",
        "handoffs",  # handoff/ (0002): empty here, keyed by tenant like the rest
        "handoff_messages",
    }
    for table in ("sessions", "messages"):
        rows = await pg.fetch(f"SELECT * FROM {table}")  # noqa: S608 - fixed names
        assert rows
        for row in rows:
            tenant = row["tenant"]
            assert tenant in ("t1", "t2")
            assert row["session_id"] in sessions[tenant]
            if table == "messages" and row["role"] == "user":
                assert row["text"].startswith(tenant)
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE tenant = 't1'") == 4
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE tenant = 't2'") == 4


async def test_session_lost_from_redis_comes_back_whole(
    durable: KoreroServer, redis_proc: RedisProcess, sim: UpstreamSim
) -> None:
    async with ChatClient(f"127.0.0.1:{durable.port}") as client:
        conversation = await client.conversation(metadata=pb.SessionMetadata(customer_name="Mere"))
        first = await run_turn(conversation, "How heavy may my bag be?", "r1")
        second = await run_turn(conversation, "And a second bag?", "r2")
        await conversation.close()
        before = await client.get_session(conversation.session_id)
        redis_proc.client().flushall()  # Redis lost everything

        resumed = await client.conversation(session_id=conversation.session_id)
        session = resumed.started.session_started.session
        assert resumed.started.session_started.resumed
        assert session.metadata.customer_name == "Mere"
        assert session.create_time.ToSeconds() == before.create_time.ToSeconds()
        assert session.turn_count == 2
        assert resumed.started.seq >= second[-1].seq  # never backwards
        # A retried message is still answered from the stored answer.
        again = await run_turn(resumed, "How heavy may my bag be?", "r1")
        assert again[0].turn_started.replayed
        assert text_of(again) == text_of(first)
        assert len(sim.requests) == 2
        third = await run_turn(resumed, "Thanks", "r3")
        assert third[0].turn_id == "t3"
        assert third[0].seq > again[-1].seq > second[-1].seq
        assert "And a second bag?" in [
            m["content"] for m in sim.requests[-1].body["messages"]
        ]  # the history came back into the prompt
        history = await client.list_messages(conversation.session_id)
        assert [m.client_message_id for m in history.messages if m.role == pb.ROLE_USER] == [
            "r1",
            "r2",
            "r3",
        ]


async def test_unknown_session_is_reported_lost_not_half_restored(
    durable: KoreroServer, redis_proc: RedisProcess
) -> None:
    async with ChatClient(f"127.0.0.1:{durable.port}") as client:
        with pytest.raises(ChatError) as info:
            await client.conversation(session_id="0" * 32)
        assert info.value.reason == "SESSION_NOT_FOUND"
    keys = redis_proc.client().keys("kr:{default:" + "0" * 32 + "}*")
    assert keys == []  # nothing half-made


async def test_list_messages_pages_beyond_the_redis_window(
    redis_url: str, sim: UpstreamSim, pg_url: str, pg: asyncpg.Connection
) -> None:
    app = await KoreroServer.start(
        durable_settings(redis_url, sim, pg_url, engine__history_max_messages=4)
    )
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            for i in range(5):
                await run_turn(conversation, f"message {i}", f"p{i}")
            texts: list[str] = []
            token = ""
            pages = 0
            while True:
                page = await client.list_messages(conversation.session_id, 3, token)
                texts += [m.text for m in page.messages if m.role == pb.ROLE_USER]
                pages += 1
                token = page.next_page_token
                if not token:
                    break
            assert texts == [f"message {i}" for i in range(5)]
            assert pages == 4  # 10 messages, 3 a page
            with pytest.raises(ChatError) as info:
                await client.list_messages(conversation.session_id, 3, "b2s6MA==")
            assert info.value.reason == "INVALID_PAGE_TOKEN"
            for turn in ("2147483648", "99999999999999999999"):  # beyond PostgreSQL's int4
                absurd = base64.urlsafe_b64encode(f"m:{turn}:0".encode()).decode()
                with pytest.raises(ChatError) as info:
                    await client.list_messages(conversation.session_id, 3, absurd)
                assert info.value.reason == "INVALID_PAGE_TOKEN"
    finally:
        await app.shutdown(grace=0.5)


_HANDOFF_TABLES = ("handoffs", "handoff_messages")


async def _count(pg: asyncpg.Connection, table: str, session_id: str) -> int:
    query = f"SELECT count(*) FROM {table} WHERE session_id = $1"  # noqa: S608 - our names
    return int(await pg.fetchval(query, session_id))


async def test_delete_session_removes_it_everywhere_and_is_idempotent(
    durable: KoreroServer, redis_proc: RedisProcess, pg: asyncpg.Connection
) -> None:
    async with ChatClient(f"127.0.0.1:{durable.port}") as client:
        keep = await client.conversation()
        await run_turn(keep, "keep me", "k1")
        gone = await client.conversation()
        await run_turn(gone, "delete me", "d1")
        # A handoff (recorded by the server) and a message written to its agent (the
        # row the recorder writes once an agent has it; no agent here) go too.
        await run_turn(gone, "I want to talk to a real person", "d2")
        recorder = durable.recorder
        assert recorder is not None

        async def recorded() -> bool:
            await recorder.flush()
            return await _count(pg, "handoffs", gone.session_id) == 1

        await wait_until(recorded, 10)
        await pg.execute(
            "INSERT INTO handoff_messages (tenant, session_id, seq, handoff_id, role, text,"
            " created_at) SELECT tenant, session_id, 99, handoff_id, 'customer', 'my card',"
            " now() FROM handoffs WHERE session_id = $1",
            gone.session_id,
        )
        await gone.close()
        await client.stub.DeleteSession(pb.DeleteSessionRequest(session_id=gone.session_id))
        assert redis_proc.client().keys(f"kr:{{default:{gone.session_id}}}*") == []
        assert await _rows(pg, gone.session_id) == []
        for table in ("sessions", *_HANDOFF_TABLES):
            assert await _count(pg, table, gone.session_id) == 0
        with pytest.raises(ChatError) as info:
            await client.get_session(gone.session_id)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            await client.stub.DeleteSession(pb.DeleteSessionRequest(session_id=gone.session_id))
        assert rpc.value.code() == grpc.StatusCode.NOT_FOUND
        await client.stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=gone.session_id, allow_missing=True)
        )
        # A write read before the deletion (an outbox sweep in flight) cannot bring it back.
        stale = OutboxBatch()
        add_entry(
            stale,
            "default",
            gone.session_id,
            "1-1",
            b'{"k":"u","turn":9,"turn_id":"t9","cmid":"late","text":"late","ts":1}',
        )
        assert durable.history is not None
        await durable.history.apply(stale)
        assert await _rows(pg, gone.session_id) == []
        assert not await pg.fetchval(
            "SELECT count(*) FROM sessions WHERE session_id = $1", gone.session_id
        )
        # The other session is untouched.
        assert len(await _rows(pg, keep.session_id)) == 2
        assert (await client.get_session(keep.session_id)).turn_count == 1


async def test_chat_stays_up_and_catches_up_when_postgres_is_unreachable(
    redis_url: str, sim: UpstreamSim, pg_url: str, pg: asyncpg.Connection
) -> None:
    # Port 9: nothing listens. The chat works; the outbox holds the writes.
    dead = "postgresql://postgres@127.0.0.1:9/korero"
    app = await KoreroServer.start(durable_settings(redis_url, sim, dead, postgres__timeout=0.5))
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            for i in range(3):
                events = await run_turn(conversation, f"while down {i}", f"w{i}")
                assert events[-1].WhichOneof("kind") == "done"
            assert app.outbox is not None
            await wait_until(lambda: _async(app.outbox.backlog >= 6), timeout=5)  # type: ignore[union-attr]
            metrics = app.metrics.registry.get_sample_value("korero_postgres_outbox_backlog")
            assert metrics is not None
            assert metrics >= 6
    finally:
        await app.shutdown(grace=0.5)
    # PostgreSQL "returns": a server pointed at it drains the backlog left in Redis.
    app = await KoreroServer.start(durable_settings(redis_url, sim, pg_url))
    try:
        await wait_until(lambda: _has_rows(pg, conversation.session_id, 6), timeout=10)
        assert [r[2] for r in await _rows(pg, conversation.session_id)] == [
            "w0",
            "w0",
            "w1",
            "w1",
            "w2",
            "w2",
        ]
        await wait_until(lambda: _async(app.outbox.backlog == 0), timeout=5)  # type: ignore[union-attr]
    finally:
        await app.shutdown(grace=0.5)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.slow  # a private PostgreSQL started and stopped twice
async def test_history_health_follows_postgres_with_no_traffic(
    redis_url: str, sim: UpstreamSim
) -> None:
    """`korero.history` follows PostgreSQL within seconds with no chat at all: a server
    started while it is down, then it comes up, stops, and comes back — the default
    KORERO_POSTGRES_PROBE_INTERVAL, no message sent. The chat service stays SERVING."""
    proc = PostgresProcess(free_port())  # initialised, not started: nothing listens yet
    url = f"{proc.base_url}/korero"
    seen: list[tuple[int, int, int]] = []  # (history, server "", chat service) per poll
    try:
        app = await KoreroServer.start(durable_settings(redis_url, sim, url, postgres__timeout=0.5))
        try:
            async with grpc.aio.insecure_channel(app.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def status(service: str) -> int:
                    request = health_pb2.HealthCheckRequest(service=service)
                    return int((await health.Check(request, timeout=2)).status)

                async def becomes(wanted: int, within: float) -> float:
                    started = time.monotonic()
                    while True:
                        poll = (
                            await status(HISTORY_HEALTH),
                            await status(""),
                            await status(CHAT_SERVICE),
                        )
                        seen.append(poll)
                        if poll[0] == wanted:
                            return time.monotonic() - started
                        assert time.monotonic() - started < within, (
                            f"korero.history not {wanted} after {within}s: {poll}"
                        )
                        await asyncio.sleep(0.1)

                await becomes(NOT_SERVING, within=5)  # started while PostgreSQL is down
                await asyncio.to_thread(proc.start)
                await ensure_database(url)
                await migrate(url)
                await becomes(SERVING, within=5)
                await asyncio.to_thread(proc.stop)  # an outage while nobody chats
                await becomes(NOT_SERVING, within=5)
                await asyncio.to_thread(proc.start)
                await becomes(SERVING, within=5)
            assert app.outbox is not None
            assert app.outbox.written == 0  # no write ever told the writer anything
        finally:
            await app.shutdown(grace=0.5)
    finally:
        await asyncio.to_thread(proc.cleanup)
    # The chat itself was SERVING at every poll, PostgreSQL up or down.
    assert {(chat, main) for _, main, chat in seen} == {(SERVING, SERVING)}


async def _async(value: bool) -> bool:
    return value


async def _has_rows(pg: asyncpg.Connection, session_id: str, n: int) -> bool:
    return len(await _rows(pg, session_id)) >= n


@pytest.mark.slow  # spawns `korero`
def test_db_migrate_is_idempotent_and_creates_the_database() -> None:
    url = asyncio.run(fresh_database()).rsplit("/", 1)[0] + "/korero_cli_" + "x" * 6
    try:
        cmd = [sys.executable, "-m", "korero.client.cli", "db", "migrate", "--url", url]
        first = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
        assert "created the database" in first.stdout
        assert "applied 0001_history" in first.stdout
        second = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
        assert "schema is up to date" in second.stdout
        assert asyncio.run(migrate(url)) == []
    finally:
        asyncio.run(drop_database(url))


@pytest.mark.slow  # spawns `korero`
async def test_sessions_purge_deletes_idle_sessions_of_one_tenant(
    durable: KoreroServer, pg_url: str, pg: asyncpg.Connection, redis_url: str
) -> None:
    async with ChatClient(f"127.0.0.1:{durable.port}") as client:
        old = await client.conversation()
        await run_turn(old, "old news", "o1")
        new = await client.conversation()
        await run_turn(new, "fresh", "n1")
    await pg.execute(
        "UPDATE sessions SET updated_at = now() - interval '100 days' WHERE session_id = $1",
        old.session_id,
    )
    await pg.execute(
        "INSERT INTO sessions (tenant, session_id, created_at, updated_at)"
        " VALUES ('other', $1, now() - interval '1 year', now() - interval '1 year')",
        old.session_id,
    )
    env = {"KORERO_POSTGRES_URL": pg_url, "REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "korero.client.cli", "sessions", "purge", "--tenant", "default"]
    out = await asyncio.to_thread(
        subprocess.run,
        [*cmd, "--older-than", "90d"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    assert "deleted 1 sessions of default" in out.stdout
    assert await _rows(pg, new.session_id) != []
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM messages WHERE tenant = 'default' AND session_id = $1",
            old.session_id,
        )
        == 0
    )
    # Another tenant's row with the same id is not touched.
    assert await pg.fetchval("SELECT count(*) FROM sessions WHERE tenant = 'other'") == 1


async def test_text_postgresql_refuses_is_stored_cleaned_not_stuck(
    durable: KoreroServer, pg: asyncpg.Connection
) -> None:
    # NUL is valid UTF-8 and fine in Redis, but PostgreSQL refuses it in text and jsonb:
    # left as is, one such message would hold back every session's writes.
    async with ChatClient(f"127.0.0.1:{durable.port}") as client:
        conversation = await client.conversation(
            metadata=pb.SessionMetadata(customer_name="Nul\x00Name")
        )
        await run_turn(conversation, "hello\x00there", "n1")
        after = await client.conversation()
        await run_turn(after, "and the next session", "n2")
    rows = await _rows(pg, conversation.session_id)
    assert rows[0] == ("user", "hello\ufffdthere", "n1")
    metadata = await pg.fetchval(
        "SELECT metadata FROM sessions WHERE session_id = $1", conversation.session_id
    )
    assert "Nul\ufffdName" in metadata
    assert len(await _rows(pg, after.session_id)) == 2

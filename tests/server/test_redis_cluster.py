"""Redis Cluster: the guarantees the hash tags promise, checked on a real cluster.

Every other Redis-touching test also runs against a cluster with
`KORERO_TEST_REDIS=cluster` (`make test-redis-cluster`); these are the
checks that only make sense there: no CROSSSLOT anywhere (Redis's own error
counters say so), NOSCRIPT answered by loading on the right node, pipelines
spanning nodes, and a primary failover survived.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from korero.client import ChatClient, ChatError, Conversation
from korero.server.app import KoreroServer
from korero.server.policy.api_keys import ApiKeyStore
from korero.server.storage.keys import kb_key, session_key
from korero.sim import SimConfig, UpstreamSim
from korero.testing import PrivateRedisCluster
from tests.conftest import make_settings
from tests.helpers import ingest_sample, kinds, redis_client, run_turn

pytestmark = pytest.mark.slow

SESSIONS = 12
"""Enough sessions for every primary to own some (all on one: 3 x 3^-12)."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedisCluster]:
    proc = PrivateRedisCluster(tmp_path_factory.mktemp("cluster"))
    proc.start()
    yield proc
    proc.stop()


def _error_stats(cluster: PrivateRedisCluster) -> tuple[Counter[str], Counter[str]]:
    """Error replies the nodes have sent, by their first word (CROSSSLOT, NOSCRIPT, …),
    and which commands failed."""
    errors: Counter[str] = Counter()
    commands: Counter[str] = Counter()
    for node in cluster.nodes:
        with node.client() as c:
            for name, value in c.info("errorstats").items():
                errors[name.removeprefix("errorstat_")] += int(value["count"])
            for name, value in c.info("commandstats").items():
                failed = int(value.get("failed_calls", 0)) + int(value.get("rejected_calls", 0))
                if failed:
                    commands[name.removeprefix("cmdstat_")] += failed
    return errors, commands


async def test_no_script_or_pipeline_is_crossslot_and_noscript_is_reloaded(
    cluster: PrivateRedisCluster, sim: UpstreamSim
) -> None:
    cluster.client().flushall()
    for node in cluster.nodes:
        with node.client() as c:
            c.config_resetstat()
    await ingest_sample(cluster.url)
    app = await KoreroServer.start(make_settings(cluster.url, sim.base_url, auth__mode="on"))
    try:
        key, _ = await ApiKeyStore(app.store.redis).create("default", "bot")
        target = f"127.0.0.1:{app.port}"
        async with ChatClient(target, metadata=[("authorization", f"Bearer {key}")]) as client:
            conversations = [await client.conversation() for _ in range(SESSIONS)]
            # Sessions, the tenant's KB/cache and its rate-limit buckets on
            # different primaries: every turn's pipelines span nodes.
            owners = {
                cluster.primary_of(session_key("default", c.session_id, "meta")).port
                for c in conversations
            }
            assert len(owners) >= 2
            question = "What is the checked baggage allowance?"
            for round_ in range(2):
                turns = await asyncio.gather(
                    *(run_turn(c, question, f"q{round_}") for c in conversations)
                )
                assert all(kinds(t)[-1] == "done" for t in turns)
                if round_ == 0:  # every node forgets its scripts
                    for node in cluster.nodes:
                        with node.client() as c:
                            c.script_flush()
            assert sum(t[-1].done.cached for t in turns) >= SESSIONS - 1  # the 2nd round hits
            again = await run_turn(conversations[0], question, "q1")  # a retried message
            assert again[-1].done.cached or kinds(again)[-1] == "done"
            resumed = await client.conversation(conversations[1].session_id)
            assert resumed.started.session_started.session.message_count == 4
            page = await client.list_messages(conversations[2].session_id)
            assert [m.client_message_id for m in page.messages if m.client_message_id] == [
                "q0",
                "q1",
            ]
    finally:
        await app.shutdown(grace=0)
    errors, commands = _error_stats(cluster)
    assert "CROSSSLOT" not in errors, errors
    assert errors["NOSCRIPT"] > 0  # the flush was noticed and answered by loading
    # Every failed script call was a NOSCRIPT, every other failed command a
    # MOVED redirect the client followed. (Redis 7.0 also counts an `ERR` for
    # each connection's `CLIENT SETINFO`, which it does not know; redis-py
    # ignores it, and it is no command of ours.)
    assert commands["evalsha"] <= errors["NOSCRIPT"], (errors, commands)
    assert sum(commands.values()) - commands["evalsha"] <= errors["MOVED"], (errors, commands)
    assert set(errors) <= {"NOSCRIPT", "MOVED", "ERR"}, errors


async def _steady_turns(
    conversation: Conversation,
    name: str,
    stop: asyncio.Event,
    log: list[tuple[str, str, float, float, str]],
) -> None:
    """Turns one after another; a failed one is retried with the same message id."""
    n = 0
    cmid = f"{name}-0"
    while not stop.is_set():
        started = time.monotonic()
        try:
            events = await run_turn(conversation, f"message {n}", cmid)
            outcome = (
                kinds(events)[-1]
                if events[-1].WhichOneof("kind") == "done"
                else (events[-1].error.reason)
            )
        except ChatError as error:
            outcome = error.reason or error.code.name
        log.append((name, cmid, started, time.monotonic(), outcome))
        if outcome == "done":
            n += 1
            cmid = f"{name}-{n}"
        else:
            await asyncio.sleep(0.05)


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[PrivateRedisCluster]:
    proc = PrivateRedisCluster(tmp_path / "replicated", replicas=1)
    proc.start()
    yield proc
    proc.stop()


async def test_a_primary_failover_is_survived(replicated: PrivateRedisCluster) -> None:
    """Kill -9 a primary under steady load: its sessions stall, then carry on.

    Documented behaviour (docs/scaling.md, "Redis Cluster"): a call on the
    failed primary's slots that certainly did not run is sent again every
    0.25 s until the replica is promoted (here about 2-3 s, cluster-node-timeout
    1 s), within KORERO_REDIS_FAILOVER_WAIT, so turns stall rather than fail.
    A turn whose write was in flight at the instant of the kill (outcome
    unknown) ends with `STORE_UNAVAILABLE`; its client retries the same
    message id, which is answered once — at once, or, when the lost write
    was the turn's begin, after the session's turn lock expires
    (KORERO_TURN_TIMEOUT + 30 s). No message is lost or answered twice.
    """
    cluster = replicated
    async with UpstreamSim(SimConfig(ttft=0.02, answer_tokens=8)) as sim:
        settings = make_settings(
            cluster.url,
            sim.base_url,
            limits__enabled=False,
            engine__turn_timeout=2.0,
            # Every turn of the run stays in the stored history (an idle machine
            # runs over 100 turns per session and the default keeps 200 messages),
            # so the exactly-once check below sees all of them.
            engine__history_max_messages=100_000,
        )
        lock_expiry = settings.engine.turn_timeout + 30
        app = await KoreroServer.start(settings)
        stop = asyncio.Event()
        log: list[tuple[str, str, float, float, str]] = []
        workers: list[asyncio.Task[None]] = []
        try:
            async with ChatClient(f"127.0.0.1:{app.port}") as client:
                conversations = [await client.conversation() for _ in range(SESSIONS)]
                owner = {
                    c.session_id: cluster.primary_of(session_key("default", c.session_id, "meta"))
                    for c in conversations
                }
                tenant_slot = cluster.primary_of(kb_key("default", "meta")).port
                # A primary holding sessions, but not the tenant's KB/cache slot.
                victim = next(n for n in owner.values() if n.port != tenant_slot)
                doomed = {sid for sid, node in owner.items() if node is victim}
                workers = [
                    asyncio.create_task(_steady_turns(c, c.session_id, stop, log))
                    for c in conversations
                ]
                await asyncio.sleep(1.5)
                killed_at = time.monotonic()
                victim.kill()
                healed = await asyncio.to_thread(cluster.wait_ok, 30)

                def answered_since_healed() -> set[str]:
                    return {
                        name
                        for name, _, started, _, outcome in log
                        if outcome == "done" and started > killed_at + healed
                    }

                async with asyncio.timeout(lock_expiry + 10):
                    while answered_since_healed() != set(owner):
                        await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)  # a few more turns on the new primary
                stop.set()
                async with asyncio.timeout(settings.engine.turn_timeout + 5):
                    await asyncio.gather(*workers)
        finally:
            stop.set()
            for worker in workers:
                worker.cancel()
            await app.shutdown(grace=0)

    failures = [entry for entry in log if entry[4] != "done"]
    assert {name for name, *_ in failures} <= doomed, (
        "a session on a live primary failed",
        failures,
    )
    assert {outcome for *_, outcome in failures} <= {"STORE_UNAVAILABLE", "TURN_NOT_COMPLETED"}
    # Only a turn whose write was in flight when the primary died failed first.
    first_failure = {}
    for name, _, started, _, _ in failures:
        first_failure.setdefault(name, started)
    assert all(started < killed_at + 0.1 for started in first_failure.values()), failures
    # Exactly once: every message id answered once, in order, in its session.
    store = redis_client(cluster.url)
    try:
        for conversation in conversations:
            sid = conversation.session_id
            raw = await store.lrange(session_key("default", sid, "history"), 0, -1)
            user_ids = [m for m in (_cmid(r) for r in raw) if m]
            answered = [c for name, c, *_, outcome in log if name == sid and outcome == "done"]
            assert user_ids == answered, sid
            assert len(set(answered)) == len(answered), sid
    finally:
        await store.aclose()
    recovery = {
        name: min(
            end for n, _, started, end, o in log if n == name and o == "done" and end > killed_at
        )
        - killed_at
        for name in doomed
    }
    elsewhere = [
        end - start
        for name, _, start, end, _ in log
        if name not in doomed and start < killed_at + healed and end > killed_at
    ]
    print(
        f"\nfailover: replica promoted {healed:.2f} s after kill -9; "
        f"{len(doomed)}/{SESSIONS} sessions on the failed primary; {len(log)} turns; "
        f"{len(failures)} ended STORE_UNAVAILABLE/TURN_NOT_COMPLETED "
        f"({len(first_failure)} sessions, turns in flight at the kill); "
        f"each failed-primary session answered again after at most "
        f"{max(recovery.values()):.2f} s; slowest turn on the other primaries "
        f"{max(elsewhere, default=0.0):.2f} s; 0 lost, 0 duplicated"
    )


def _cmid(raw: bytes) -> str:
    import json  # noqa: PLC0415

    message = json.loads(raw)
    return str(message.get("cmid", "")) if message.get("role") == "user" else ""


async def test_the_cluster_url_names_several_seeds_and_refuses_a_database(
    cluster: PrivateRedisCluster,
) -> None:
    client = redis_client(cluster.url)  # two seeds, comma-separated
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    with pytest.raises(ValueError, match="database 0"):
        redis_client(cluster.url + "/2")
    assert grpc  # imported for ChatError codes in the failover test

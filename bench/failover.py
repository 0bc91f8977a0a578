"""Three instances behind Envoy under steady load: SIGTERM one, then kill -9 another.

`run_failover()` drives `conversations` conversations through one Envoy
(native gRPC `Chat` streams, one turn after another with a pause), then

1. sends SIGTERM to instance 1 — it reports NOT_SERVING, finishes its turns
   in flight within the grace, ends its streams with UNAVAILABLE;
2. once it has exited, kills instance 2 with SIGKILL (turns in flight die
   with it);

and keeps going until every conversation has been answered again after the
kill. The client is `korero.client.ChatClient`: with `reconnect` on (its
default) it reopens a broken stream itself, from its last seq (the resume
cursor), and resends a message the server never got; with it off
(`FailoverConfig.reconnect=False`), this scenario does what a client without
the cursor does — on a stream that ends it re-opens the session by id
(through Envoy, so on a live instance) and resends the message it had no
answer to, with the same `client_message_id`. Either way an error event that
says "retry" (e.g. `TURN_NOT_COMPLETED`) gets the same message again. At the end the history
in Redis is checked: every answered message exactly once, in order, with
exactly one answer — nothing lost, nothing duplicated.

Used by `tests/fleet/test_failover.py` (small sizes, asserts) and by
`python -m bench scenarios --only failover` (the table in bench/README.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fleet import Fleet
from korero.client import ChatClient, ChatError, Conversation
from korero.server.settings import RedisSettings
from korero.server.storage.connection import connect
from korero.server.storage.keys import session_key

__all__ = ["FailoverConfig", "FailoverOutcome", "run_failover"]


@dataclass(frozen=True)
class FailoverConfig:
    conversations: int = 24
    warmup: float = 3.0
    pause: float = 0.4
    """Seconds between a conversation's turns."""
    shutdown_grace: float = 2.0
    gap: float = 1.0
    """Seconds between instance 1 having exited and the kill -9 of instance 2."""
    turn_lease: float = 2.0
    """KORERO_TURN_LEASE: how long a killed instance's turn keeps its session."""
    settle: float = 1.0
    """Seconds of load after every conversation was answered again."""
    deadline: float = 45.0
    """The longest the run waits for every conversation to recover after the kill."""
    reconnect: bool = True
    """The client's own reconnect (resume cursor); off: re-open by session id here."""


@dataclass
class _Turn:
    conversation: int
    cmid: str
    started: float
    ended: float
    outcome: str
    """`done`, an error event's reason, or `stream:<CODE>` when the stream ended."""


@dataclass
class FailoverOutcome:
    """What happened, per event, and whether any message was lost or duplicated."""

    turns: list[_Turn] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)
    """Event name -> time (monotonic): sigterm, exited, kill, rotation_out_1, …"""
    sessions: dict[int, str] = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    unanswered: int = 0
    requests_per_instance: dict[str, dict[str, int]] = field(default_factory=dict)
    """Envoy's upstream request totals per instance at each event."""

    def window(self, start: str, end: str | None) -> list[_Turn]:
        lo = self.events[start]
        hi = self.events[end] if end is not None else float("inf")
        return [t for t in self.turns if lo <= t.ended < hi]

    def summary(self) -> dict[str, Any]:
        """Per event: failed turns or stream breaks, conversations hit, recovery."""
        out: dict[str, Any] = {}
        phases = [("sigterm", "kill"), ("kill", None)]
        for start, end in phases:
            failed = [t for t in self.window(start, end) if t.outcome != "done"]
            hit = sorted({t.conversation for t in failed})
            recovery = []
            for c in hit:
                first = min(t.ended for t in failed if t.conversation == c)
                after = [t.ended for t in self.turns if t.conversation == c and t.outcome == "done"
                         and t.ended > first]  # fmt: skip
                recovery.append((min(after) if after else float("inf")) - first)
            out[start] = {
                "errors": len(failed),
                "errorKinds": dict(Counter(t.outcome for t in failed)),
                "conversationsHit": len(hit),
                "recoveryMaxSeconds": max(recovery, default=0.0),
                "recoveryP50Seconds": sorted(recovery)[len(recovery) // 2] if recovery else 0.0,
            }
        answered = [t for t in self.turns if t.outcome == "done"]
        base = self.events["start"]
        out["turns"] = len(self.turns)
        out["answered"] = len(answered)
        out["turnsPerSecondBefore"] = len(
            [t for t in answered if t.ended < self.events["sigterm"]]
        ) / (self.events["sigterm"] - base)
        out["turnsPerSecondAfter"] = len(
            [t for t in answered if t.ended >= self.events["recovered"]]
        ) / max(1e-9, self.events["end"] - self.events["recovered"])
        out["lost"] = self.lost
        out["duplicated"] = self.duplicated
        out["unanswered"] = self.unanswered
        out["events"] = {k: round(v - base, 3) for k, v in self.events.items()}
        out["requestsPerInstance"] = self.requests_per_instance
        return out

    def table(self) -> str:
        s = self.summary()
        rotation = s["events"]
        rows = [
            ("SIGTERM instance 1 (drain)", s["sigterm"],
             f"{rotation.get('rotation_out_1', float('nan')) - rotation['sigterm']:.1f} s"),
            ("kill -9 instance 2", s["kill"],
             f"{rotation.get('rotation_out_2', float('nan')) - rotation['kill']:.1f} s"),
        ]  # fmt: skip
        lines = [
            "| event | turns failed or streams broken | conversations hit | kinds | "
            "recovery p50 / max | out of Envoy's rotation after |",
            "|---|---|---|---|---|---|",
        ]
        for name, phase, rotation_after in rows:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(phase["errorKinds"].items())) or "-"
            lines.append(
                f"| {name} | {phase['errors']} | {phase['conversationsHit']} | {kinds} | "
                f"{phase['recoveryP50Seconds']:.2f} s / {phase['recoveryMaxSeconds']:.2f} s | "
                f"{rotation_after} |"
            )
        lines.append(
            f"\n{s['answered']} turns answered ({s['turnsPerSecondBefore']:.1f}/s on 3 instances "
            f"before, {s['turnsPerSecondAfter']:.1f}/s on the one left after); lost "
            f"{s['lost']}, duplicated {s['duplicated']}, unanswered at the end {s['unanswered']}."
        )
        return "\n".join(lines)


async def _converse(
    index: int,
    client: ChatClient,
    stop: asyncio.Event,
    outcome: FailoverOutcome,
    pause: float,
) -> None:
    conversation: Conversation | None = None
    n = 0
    while not stop.is_set():
        cmid = f"c{index}-{n}"
        started = time.monotonic()
        try:
            if conversation is None:
                conversation = await client.conversation(outcome.sessions.get(index, ""))
                outcome.sessions[index] = conversation.session_id
            events = [e async for e in conversation.send(f"question {n} of {index}", cmid)]
            last = events[-1]
            result = "done" if last.WhichOneof("kind") == "done" else last.error.reason
        except ChatError as error:
            result = f"stream:{error.code.name}"
            conversation = None
        outcome.turns.append(_Turn(index, cmid, started, time.monotonic(), result))
        if result == "done":
            n += 1
            await asyncio.sleep(pause)
        else:
            await asyncio.sleep(0.1)
    if conversation is not None:
        await conversation.close()


async def _requests_per_instance(fleet: Fleet) -> dict[str, int]:
    import aiohttp  # noqa: PLC0415

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{fleet.admin_port}/clusters") as response,
    ):
        text = await response.text()
    names = {i.grpc: i.name for i in fleet.instances}
    totals = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "korero_grpc" and parts[2] == "rq_total":
            totals[names.get(parts[1], parts[1])] = int(parts[3])
    return totals


async def _watch_rotation(fleet: Fleet, outcome: FailoverOutcome, stop: asyncio.Event) -> None:
    """Record when each instance leaves Envoy's rotation (fails its health check)."""
    while not stop.is_set():
        flags = await fleet.health()
        for i, instance in enumerate(fleet.instances[:2], start=1):
            key = f"korero_grpc::{instance.grpc}"
            if key in flags and flags[key] != "healthy":
                outcome.events.setdefault(f"rotation_out_{i}", time.monotonic())
        await asyncio.sleep(0.05)


async def _check_history(redis_url: str, outcome: FailoverOutcome) -> None:
    """Every answered message exactly once, in order, answered exactly once."""
    client = connect(RedisSettings(url=redis_url, timeout=5.0))
    try:
        for index, sid in outcome.sessions.items():
            raw = await client.lrange(session_key("default", sid, "history"), 0, -1)
            messages = [json.loads(r) for r in raw]
            users = [m["cmid"] for m in messages if m["role"] == "user"]
            answers = Counter(m["turn_id"] for m in messages if m["role"] == "assistant")
            done = [
                t.cmid for t in outcome.turns if t.conversation == index and t.outcome == "done"
            ]
            outcome.duplicated += len(users) - len(set(users))
            outcome.duplicated += max(0, sum(answers.values()) - len(done))
            outcome.lost += len([c for c in done if c not in users])
            if users[: len(done)] != done:
                outcome.lost += 1  # out of order counts as lost
            outcome.unanswered += len([c for c in users if c not in done])
    finally:
        await client.aclose()


async def run_failover(
    workdir: Path, *, redis_url: str, llm_url: str, config: FailoverConfig | None = None
) -> FailoverOutcome:
    cfg = config or FailoverConfig()
    fleet = Fleet(
        workdir,
        count=3,
        env={
            "REDIS_URL": redis_url,
            "KORERO_LLM_BASE_URL": llm_url,
            "KORERO_LLM_API_KEY": "bench",
            "KORERO_SHUTDOWN_GRACE": str(cfg.shutdown_grace),
            "KORERO_TURN_LEASE": str(cfg.turn_lease),
            "KORERO_RATE_LIMITS": "false",
            "KORERO_CACHE_ENABLED": "false",
            "KORERO_LOG_LEVEL": "INFO",  # the fleet waits for each instance's event=serving
        },
    )
    outcome = FailoverOutcome()
    stop = asyncio.Event()
    watching = asyncio.Event()
    try:
        await fleet.start()
        reconnect = {} if cfg.reconnect else {"reconnect": None}
        async with ChatClient(fleet.target, **reconnect) as client:  # type: ignore[arg-type]
            outcome.events["start"] = time.monotonic()
            tasks = [
                asyncio.create_task(_converse(i, client, stop, outcome, cfg.pause))
                for i in range(cfg.conversations)
            ]
            watcher = asyncio.create_task(_watch_rotation(fleet, outcome, watching))
            await asyncio.sleep(cfg.warmup)
            first, second = fleet.instances[0], fleet.instances[1]
            outcome.requests_per_instance["before"] = await _requests_per_instance(fleet)
            outcome.events["sigterm"] = time.monotonic()
            await fleet.sigterm(first)
            assert first.process is not None
            await asyncio.wait_for(first.process.proc.wait(), cfg.shutdown_grace + 15)
            outcome.events["exited"] = time.monotonic()
            await asyncio.sleep(cfg.gap)
            outcome.requests_per_instance["at kill"] = await _requests_per_instance(fleet)
            outcome.events["kill"] = time.monotonic()
            fleet.kill(second)
            killed = outcome.events["kill"]
            deadline = killed + cfg.deadline
            while time.monotonic() < deadline:
                recovered = {
                    t.conversation
                    for t in outcome.turns
                    if t.outcome == "done" and t.started > killed
                }
                if len(recovered) == cfg.conversations:
                    break
                await asyncio.sleep(0.1)
            outcome.events["recovered"] = time.monotonic()
            # Keep the load on until Envoy's health checks have taken the dead one out.
            out_by = time.monotonic() + 10
            while "rotation_out_2" not in outcome.events and time.monotonic() < out_by:  # noqa: ASYNC110 - the watcher writes a dict
                await asyncio.sleep(0.1)
            await asyncio.sleep(cfg.settle)
            stop.set()
            watching.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            outcome.events["end"] = time.monotonic()
            outcome.requests_per_instance["end"] = await _requests_per_instance(fleet)
            await watcher
        await _check_history(redis_url, outcome)
    finally:
        stop.set()
        watching.set()
        await fleet.stop()
    return outcome


def scenario_failover(ctx: Any) -> dict[str, Any]:
    """`python -m bench scenarios --only failover`: the run above at full size, with the
    client's reconnect (resume cursor) on, then off."""
    from bench.procs import ProcessGroup  # noqa: PLC0415

    out: dict[str, Any] = {}
    md = "8. Failover: 3 instances behind Envoy, SIGTERM one, then kill -9 another\n"
    for reconnect in (True, False):
        with ProcessGroup() as g:
            redis_url, _, _ = g.redis()
            llm, _ = g.sim(ttft_ms=50, tokens_per_second=200, answer_tokens=16)
            cfg = FailoverConfig(
                conversations=ctx.size(60, 16), warmup=ctx.size(5, 2), reconnect=reconnect
            )
            outcome = asyncio.run(
                run_failover(g.workdir, redis_url=redis_url, llm_url=llm, config=cfg)
            )
        label = "reconnect on (resume cursor)" if reconnect else "reconnect off (re-open by id)"
        out[label] = outcome.summary()
        md += f"\nClient {label}:\n\n" + outcome.table() + "\n"
    print("\n" + md)
    return {**out, "table": md}

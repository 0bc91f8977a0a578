"""A load of conversations that survives faults, and the history checker.

`ConversationLoad` runs N conversations of M turns each against a server;
every client retries a failed turn with the same `client_message_id` (bounded)
and resumes (or, if the session is reported lost, restarts) its session when
the stream breaks. It records every message the server acknowledged — a
`done` (answer stored) and a `turn_started` (message stored) — with its session.

`check_history` then reads PostgreSQL: every acknowledged message appears
exactly once, in its own session and tenant, in the order acknowledged.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg

from korero.client import ChatClient, ChatError, Conversation


@dataclass
class Ack:
    tenant: str
    session_id: str
    client_message_id: str
    answer: str


@dataclass
class LoadResult:
    done: list[Ack] = field(default_factory=list)
    """Messages whose `done` arrived, in the order acknowledged (per session)."""
    started: list[Ack] = field(default_factory=list)
    """Messages whose `turn_started` arrived (whether or not they finished)."""
    errors: Counter[str] = field(default_factory=Counter)
    lost_sessions: int = 0
    gave_up: int = 0


class ConversationLoad:
    """N conversations × M turns, retried through faults; bounded in attempts and time."""

    def __init__(
        self,
        target: str,
        *,
        tenant: str = "default",
        conversations: int = 20,
        turns: int = 5,
        attempts: int = 40,
        pause: float = 0.0,
    ) -> None:
        self.target = target
        self.tenant = tenant
        self.conversations = conversations
        self.turns = turns
        self.attempts = attempts
        self.pause = pause
        self.result = LoadResult()

    async def run(self, deadline: float = 120.0) -> LoadResult:
        async with asyncio.timeout(deadline):
            await asyncio.gather(*(self._one(i) for i in range(self.conversations)))
        return self.result

    async def _open(self, client: ChatClient, session_id: str) -> Conversation | None:
        try:
            return await client.conversation(session_id=session_id)
        except ChatError as error:
            self.result.errors[error.reason or error.code.name] += 1
            if error.reason == "SESSION_NOT_FOUND":
                self.result.lost_sessions += 1
                return await client.conversation()  # lost before anything was acknowledged
            return None

    async def _one(self, index: int) -> None:
        rng = random.Random(index)
        async with ChatClient(self.target) as client:
            conversation: Conversation | None = None
            session_id = ""
            turn = 0
            attempts = 0
            while turn < self.turns:
                attempts += 1
                if attempts > self.attempts:
                    self.result.gave_up += 1
                    return
                if conversation is None:
                    try:
                        conversation = await self._open(client, session_id)
                    except ChatError as error:
                        self.result.errors[error.reason or error.code.name] += 1
                        conversation = None
                    if conversation is None:
                        await asyncio.sleep(0.1 + rng.random() * 0.2)
                        continue
                    if conversation.session_id != session_id:
                        session_id = conversation.session_id
                        turn = 0  # a new session (the old one was lost before any ack)
                cmid = f"c{index}-{session_id[:6]}-{turn}"
                text = f"conversation {index} question {turn}"
                try:
                    answer, ended = await self._turn(conversation, text, cmid)
                except ChatError as error:
                    self.result.errors[error.reason or error.code.name] += 1
                    await conversation.close()
                    conversation = None
                    await asyncio.sleep(0.05 + rng.random() * 0.1)
                    continue
                if ended is not None:
                    self.result.errors[ended] += 1
                    if ended in ("SESSION_NOT_FOUND", "SESSION_LOST"):
                        await conversation.close()
                        conversation = None
                    await asyncio.sleep(0.05 + rng.random() * 0.1)
                    continue
                self.result.done.append(Ack(self.tenant, session_id, cmid, answer))
                turn += 1
                if self.pause:
                    await asyncio.sleep(self.pause * rng.random())
            if conversation is not None:
                await conversation.close()

    async def _turn(
        self, conversation: Conversation, text: str, cmid: str
    ) -> tuple[str, str | None]:
        pieces: list[str] = []
        async for event in conversation.send(text, cmid):
            kind = event.WhichOneof("kind")
            if kind == "turn_started":
                self.result.started.append(Ack(self.tenant, conversation.session_id, cmid, ""))
            elif kind == "text_delta":
                pieces.append(event.text_delta.text)
            elif kind == "error":
                return "", event.error.reason
            elif kind == "done":
                return "".join(pieces), None
        return "", "NO_TERMINAL"


@dataclass
class CheckReport:
    acknowledged: int
    found: int
    duplicated: int
    missing: list[str]
    out_of_order: list[str]
    wrong_answer: list[str]
    started_found: int
    started: int

    def __str__(self) -> str:
        return (
            f"acknowledged={self.acknowledged} found={self.found} duplicated={self.duplicated} "
            f"missing={len(self.missing)} out_of_order={len(self.out_of_order)} "
            f"wrong_answer={len(self.wrong_answer)} "
            f"(turn_started-only acks: {self.started_found}/{self.started} found)"
        )


async def check_history(url: str, result: LoadResult) -> CheckReport:
    """Compare what the clients were told with what PostgreSQL holds."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT tenant, session_id, turn_no, role, client_message_id, text FROM messages"
            " ORDER BY tenant, session_id, turn_no, (role = 'assistant')"
        )
    finally:
        await conn.close()
    users: dict[tuple[str, str], list[str]] = {}
    answers: dict[tuple[str, str, str], str] = {}
    everywhere: Counter[str] = Counter()
    for r in rows:
        if r["role"] == "user":
            users.setdefault((r["tenant"], r["session_id"]), []).append(r["client_message_id"])
            everywhere[r["client_message_id"]] += 1
        else:
            answers[(r["tenant"], r["session_id"], r["client_message_id"])] = r["text"]
    missing, wrong, dup = [], [], 0
    by_session: dict[tuple[str, str], list[str]] = {}
    for ack in result.done:
        key = (ack.tenant, ack.session_id)
        by_session.setdefault(key, []).append(ack.client_message_id)
        stored = users.get(key, [])
        if ack.client_message_id not in stored:
            missing.append(ack.client_message_id)
        if everywhere[ack.client_message_id] > 1:
            dup += 1
        if answers.get((*key, ack.client_message_id)) != ack.answer:
            wrong.append(ack.client_message_id)
    out_of_order = []
    for key, acked in by_session.items():
        stored = [c for c in users.get(key, []) if c in set(acked)]
        if stored != acked:
            out_of_order.append(key[1])
    started_keys = {(a.tenant, a.session_id, a.client_message_id) for a in result.started}
    started_found = sum(1 for t, s, c in started_keys if c in users.get((t, s), []))
    return CheckReport(
        acknowledged=len(result.done),
        found=len(result.done) - len(missing),
        duplicated=dup,
        missing=missing,
        out_of_order=out_of_order,
        wrong_answer=wrong,
        started_found=started_found,
        started=len(started_keys),
    )


def elapsed(since: float) -> float:
    return time.monotonic() - since

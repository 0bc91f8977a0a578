"""Early upstream requests: the model is asked while the turn's Redis round trips run.

A turn waits for two Redis round trips before its prompt can be built: the
rate-limit admission, then begin-turn (persists the message, returns the
history). They cannot be one script (the tenant's buckets and the session's
keys live in different Redis Cluster slots), and the prompt needs begin-turn's
answer. But for a session whose previous turn ended on this instance, that
answer is already known here: the history this instance just wrote, the
session's metadata and summary, the KB version. `EarlyStarts` keeps that
snapshot per session (a bounded LRU) and, when the next message arrives,
builds the prompt from it and sends the upstream request at once, while
admission and begin-turn run. Nothing here touches Redis.

Nothing is acknowledged early ("persist before acknowledge" holds):
`turn_started` and every delta are published by the runner, which starts only
after begin-turn has persisted the message, as before; the early request's
first tokens wait in its socket until then.

The speculation is checked, never trusted: the runner uses the early prompt
only when the prompt inputs begin-turn returned equal the snapshot's
(`EarlyAnswer.use`); otherwise it builds the prompt as always and the early
request is closed. A refused message (rate limited, a turn in flight, the
store down, a retry answered from the store) closes it at once, before a
model's first token. Either way the upstream sees the client go away, and
the server counts it (`korero_early_requests_total{outcome}`, and the prompt
tokens of discarded ones in `korero_early_wasted_prompt_tokens_total`).

Not used for: messages the response cache may answer (cacheable routes, when
the cache is on), turns offered tools (the tool loop builds its own
requests), and the first turn after a resume (no snapshot yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from korero.chat.v1 import chat_pb2 as pb
from korero.server.context.assembly import AssembledContext, ContextAssembler, ContextRequest
from korero.server.context.router import RouteDecision
from korero.server.conversation.turn import Turn
from korero.server.llm.provider import LLMChunk, LLMProvider, LLMRequest
from korero.server.policy.ratelimit import Admission
from korero.server.storage.records import SessionRecord, StoredMessage

__all__ = ["EarlyAnswer", "EarlyStarts"]

_OffersTools = Callable[[str, RouteDecision, SessionRecord], Awaitable[object]]

MAX_SESSIONS = 4096
"""Sessions whose snapshot is kept (least recently used dropped): a few KiB each."""


@dataclass(frozen=True)
class _Snapshot:
    session: SessionRecord
    history: tuple[StoredMessage, ...]
    kb_version: int
    last_message_id: str = ""
    """A retry of this message is answered from the store: no early request for it."""
    headroom: bool = True
    """The last admission left room for at least one more message (no limiter: True)."""


def _headroom(admission: Admission | None) -> bool:
    """Room for another message: refusals should not cost an upstream request."""
    if admission is None or admission.local:
        return admission is None
    return admission.remaining_requests >= 2 and admission.remaining_tokens >= 2 * max(
        1, admission.reserved_tokens
    )


def _inputs(request: ContextRequest) -> tuple[Any, ...]:
    """What a prompt is built from: not the counters and timestamps that change every turn."""
    session = request.session
    return (
        request.tenant,
        request.message,
        request.route,
        request.kb_version,
        json.dumps(session.metadata, sort_keys=True),
        json.dumps(session.summary, sort_keys=True),
        tuple((m.role, m.text, m.turn_id, m.client_message_id, m.intent) for m in request.history),
    )


class EarlyAnswer:
    """An upstream request sent before its turn began; used once, or discarded."""

    def __init__(self, inputs: tuple[Any, ...], context: AssembledContext, model: str,
                 stream: AsyncGenerator[LLMChunk, None]) -> None:  # fmt: skip
        self.context = context
        self.model = model
        self.outcome = ""
        self.read = False
        """The runner's generator read it (a prompt taken but not read is counted stale)."""
        self._inputs = inputs
        self._stream = stream
        # The request goes out when this task first runs: during the Redis round trips.
        self._first = asyncio.create_task(self._first_chunk(), name="early-upstream")

    async def _first_chunk(self) -> LLMChunk | None:
        try:
            return await anext(self._stream)
        except StopAsyncIteration:
            return None

    def use(self, request: ContextRequest) -> AssembledContext | None:
        """The early prompt, if `request` (from begin-turn) has the inputs it was built from."""
        if self.outcome or _inputs(request) != self._inputs:
            return None
        self.outcome = "used"
        return self.context

    async def chunks(self) -> AsyncGenerator[LLMChunk, None]:
        """The answer, as `LLMProvider.stream` would give it."""
        self.read = True
        try:
            first = await self._first
            if first is None:
                return
            yield first
            async for chunk in self._stream:
                yield chunk
        finally:
            await self.close()

    async def close(self) -> None:
        self._first.cancel()  # cancelling it closes the response: the upstream sees it
        with contextlib.suppress(BaseException):
            await self._first
        await self._stream.aclose()


class EarlyStarts:
    """Session snapshots and the early requests made from them; also the turn's LLM provider.

    As a provider (`stream`), it hands the runner's request the early answer
    whose prompt the runner took (`EarlyAnswer.use`), and anything else to `llm`.
    """

    def __init__(
        self,
        *,
        llm: LLMProvider,
        assembler: ContextAssembler,
        model: str,
        max_tokens: int,
        temperature: float,
        prompt_history_messages: int,
        cache_on: bool,
        offers_tools: Callable[[str, RouteDecision, SessionRecord], Awaitable[object]]
        | None = None,
        may_hand_off: Callable[[str, RouteDecision], bool] | None = None,
        count: Callable[[str, int], None] = lambda _outcome, _tokens: None,
    ) -> None:
        self._llm = llm
        self._assembler = assembler
        self._model = model
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._window = max(0, prompt_history_messages - 1)  # begin-turn's, minus the new message
        self._cache_on = cache_on
        self._offers_tools = offers_tools
        self._may_hand_off = may_hand_off
        self._count = count
        self._snapshots: OrderedDict[tuple[str, str], _Snapshot] = OrderedDict()
        self._kb_versions: dict[str, int] = {}
        self._in_use: dict[int, EarlyAnswer] = {}
        self._closing: set[asyncio.Task[None]] = set()

    # Snapshots -------------------------------------------------------------------

    def _keep(self, tenant: str, session_id: str, snapshot: _Snapshot) -> None:
        key = (tenant, session_id)
        self._snapshots[key] = snapshot
        self._snapshots.move_to_end(key)
        while len(self._snapshots) > MAX_SESSIONS:
            self._snapshots.popitem(last=False)

    def opened(self, session: SessionRecord, resumed: bool) -> None:
        """A new session: its first prompt has no history (a resumed one's is not known)."""
        version = self._kb_versions.get(session.tenant)
        if not resumed and version is not None:
            self._keep(session.tenant, session.session_id, _Snapshot(session, (), version))

    def answered(
        self,
        turn: Turn,
        request: ContextRequest,
        answer: str | None,
        summary: dict[str, Any] | None,
    ) -> None:
        """A turn's outcome was persisted: what begin-turn will return for the next message.

        `answer`: the stored answer (None when none is stored, e.g. cancelled).
        """
        self._kb_versions[turn.tenant] = request.kb_version
        history: list[StoredMessage] = [
            *request.history,
            StoredMessage("user", request.message, turn.turn_id, turn.client_message_id, 0.0,
                          turn.intent),
        ]  # fmt: skip
        if answer:
            history.append(StoredMessage("assistant", answer, turn.turn_id, "", 0.0))
        session = request.session if summary is None else replace(request.session, summary=summary)
        window = tuple(history[-self._window :]) if self._window else ()
        self._keep(
            turn.tenant,
            turn.session_id,
            _Snapshot(
                session,
                window,
                request.kb_version,
                turn.client_message_id,
                _headroom(turn.plan.admission),
            ),
        )

    def forget(self, tenant: str, session_id: str) -> None:
        self._snapshots.pop((tenant, session_id), None)

    # Early requests ------------------------------------------------------------------

    async def start(
        self, tenant: str, session_id: str, message: pb.UserMessage, route: RouteDecision
    ) -> EarlyAnswer | None:
        """Send the turn's upstream request now, if this instance knows its prompt.

        Not when the model may not be asked: a retry of a message in the known
        history (replayed from the store), a rate limit the last admission
        nearly reached, a turn already in flight here (its snapshot was taken
        when it started), or a message the handoff policy may escalate.
        """
        snapshot = self._snapshots.pop((tenant, session_id), None)  # the turn changes it
        if (
            snapshot is None
            or not snapshot.headroom
            or snapshot.last_message_id == message.client_message_id
            or any(m.client_message_id == message.client_message_id for m in snapshot.history)
            or (self._cache_on and route.cacheable)
            or (self._may_hand_off is not None and self._may_hand_off(message.text, route))
        ):
            return None
        text = message.text
        if self._offers_tools is not None and await self._offers_tools(
            tenant, route, snapshot.session
        ):
            return None
        request = ContextRequest(
            tenant, snapshot.session, text, snapshot.history, route, snapshot.kb_version
        )
        context = await self._assembler.assemble(request)
        if context.fallback is not None or not context.messages:
            return None
        llm_request = LLMRequest(context.messages, self._model, self._max_tokens, self._temperature)
        return EarlyAnswer(_inputs(request), context, self._model, self._llm.stream(llm_request))

    def use(self, early: EarlyAnswer | None, request: ContextRequest) -> AssembledContext | None:
        """The early prompt for the runner's `request` (None: build it as always)."""
        if early is None:
            return None
        context = early.use(request)
        if context is None:  # the session changed elsewhere: close it now, not at the end
            self.discard(early, "stale")
        else:
            self._in_use[id(context.messages)] = early
        return context

    def discard(self, early: EarlyAnswer | None, outcome: str) -> None:
        """The turn is over or refused: count the early request, close it if unused."""
        if early is None or early.outcome == "counted":
            return
        self._in_use.pop(id(early.context.messages), None)
        used = early.outcome == "used" and early.read
        early.outcome = "counted"
        self._count("used" if used else outcome, 0 if used else early.context.tokens)
        # Closed in its own task (the caller may be a turn being cancelled); a used one
        # was normally read to its end and closed by the runner's generator already.
        closing = asyncio.get_running_loop().create_task(early.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    # LLMProvider ------------------------------------------------------------------------

    def stream(self, request: LLMRequest) -> AsyncGenerator[LLMChunk, None]:
        early = self._in_use.pop(id(request.messages), None)
        if (
            early is None
            or early.context.messages is not request.messages
            or request.model != early.model
            or request.tools
        ):
            return self._llm.stream(request)
        return early.chunks()

    async def aclose(self) -> None:
        await self._llm.aclose()

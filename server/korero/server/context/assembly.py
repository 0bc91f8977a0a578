"""Context assembly: the message list sent to the model for a turn.

`KnowledgeAssembler` builds, within a token budget
(`context_window - answer_reserve`):

1. one system message: the system prompt, the answering rules (cite like
   ``[Source: Baggage Policy, Section 2.1]``), a hint from the router's
   intent, the customer's facts, the summary of older turns, and the
   knowledge-base excerpts retrieved for the question (best first, at most
   `knowledge_tokens`);
2. as much recent history as fits, newest first, in whole turns, ending with
   the new user message.

Older turns that do not fit are summarized by an LLM call through the same
provider; the summary is kept in the session's Redis hash (stored with the
turn's outcome) and reused until more turns overflow, so a long conversation
costs one summarization call every few turns, not every turn. When a
summary is made, the history is compacted to half its budget so the next
turns fit without another call.

A turn the router marks cacheable gets a prompt without customer facts,
summary or history (`shareable`), so its answer can be served to anyone who
asks the same question. A policy question with no relevant excerpt, once the
tenant has a knowledge base, is not sent to the model at all: it gets
`FALLBACK_ANSWER` (no invented policy).

Tokens are estimated, not counted: `count_tokens` is one token per 4 bytes
of UTF-8 (OpenAI's rule of thumb of ~4 characters per English token; bytes
make it more conservative for non-Latin scripts) plus 4 per message for the
chat format. No tokenizer files are needed, which keeps the server offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from korero.server.context import citations
from korero.server.context.knowledge import KnowledgeBase, Source
from korero.server.context.router import RouteDecision
from korero.server.errors import KoreroError
from korero.server.llm.provider import LLMProvider, LLMRequest
from korero.server.settings import PromptSettings
from korero.server.storage.records import SessionRecord, StoredMessage

__all__ = [
    "FALLBACK_ANSWER",
    "MESSAGE_OVERHEAD_TOKENS",
    "PROMPT_TEMPLATE_VERSION",
    "AssembledContext",
    "ContextAssembler",
    "ContextRequest",
    "KnowledgeAssembler",
    "LLMSummarizer",
    "Summarizer",
    "count_tokens",
    "prompt_tokens",
]

log = logging.getLogger(__name__)

PROMPT_TEMPLATE_VERSION = "kb1"
"""Version of the template below; part of the prompt version in cache keys."""

MESSAGE_OVERHEAD_TOKENS = 4

FALLBACK_ANSWER = (
    "I'm sorry, I couldn't find anything about that in our policies, so I won't guess. "
    "I can connect you with a human agent who can help."
)

_RULES = (
    "How to answer: when the question is about a policy, answer only from the knowledge-base "
    "excerpts below, in short bullet points. After each fact, cite its source exactly as "
    f"written in the excerpt header, for example {citations.EXAMPLE}. If the "
    "excerpts do not answer the question, say so and offer a human agent; never guess a policy."
)

_INTENT_HINTS = {
    "policy_question": "a question about our policies: answer from the excerpts",
    "booking_lookup": (
        "a question about the customer's own booking: you cannot see live booking data; "
        "use the customer's facts if given, otherwise ask for the booking reference"
    ),
    "small_talk": "small talk: reply briefly and offer help",
    "human_request": "a request for a human: say you will connect them with an agent",
    "complaint": "a complaint: acknowledge it, apologise, and offer a human agent",
}

_METADATA_LABELS = (
    ("customer_name", "Customer name"),
    ("booking_reference", "Booking reference"),
    ("locale", "Customer locale"),
)


def count_tokens(text: str) -> int:
    """Estimated tokens of `text` (see the module docstring)."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def prompt_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """Estimated tokens of a whole message list."""
    return sum(count_tokens(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in messages)


@dataclass(frozen=True)
class ContextRequest:
    """What a turn knows when its prompt is built."""

    tenant: str
    session: SessionRecord
    message: str
    """The new user message, as the engine received it."""
    history: Sequence[StoredMessage] = ()
    """Recent earlier messages, oldest first (without the new message)."""
    route: RouteDecision | None = None
    kb_version: int = 0


@dataclass(frozen=True)
class AssembledContext:
    """The prompt, and what the engine needs to know about it."""

    messages: list[dict[str, str]]
    sources: tuple[Source, ...] = ()
    """Knowledge-base excerpts in the prompt, best first."""
    fallback: str | None = None
    """Answer with this text instead of calling the model."""
    shareable: bool = False
    """The prompt holds nothing about this customer: its answer may be cached."""
    summary: dict[str, Any] | None = None
    """A new summary of older turns to store with the turn (None: unchanged)."""
    tokens: int = 0
    """Estimated prompt tokens."""


class ContextAssembler(Protocol):
    """Builds the model's message list for one turn."""

    @property
    def prompt_version(self) -> str: ...

    async def assemble(self, request: ContextRequest) -> AssembledContext: ...


class Summarizer(Protocol):
    """Condenses older turns (and the previous summary) into a short text."""

    async def summarize(self, previous: str, messages: Sequence[StoredMessage]) -> str: ...


class LLMSummarizer:
    """Summarizes through the same LLM provider as the answers."""

    def __init__(self, *, llm: LLMProvider, model: str, max_tokens: int, timeout: float) -> None:
        self._llm = llm
        self._model = model
        self._max_tokens = max_tokens
        self._timeout = timeout

    async def summarize(self, previous: str, messages: Sequence[StoredMessage]) -> str:
        words = max(20, self._max_tokens * 3 // 4)
        lines = [f"{'customer' if m.role == 'user' else 'assistant'}: {m.text}" for m in messages]
        body = (f"Earlier summary: {previous}\n\n" if previous else "") + "Conversation:\n"
        request = LLMRequest(
            [
                {
                    "role": "system",
                    "content": f"Summarize this customer-support conversation in at most {words} "
                    "words. Keep what the customer told us (bookings, names, dates, needs) and "
                    "what was answered or promised. Reply with the summary only.",
                },
                {"role": "user", "content": body + "\n".join(lines)},
            ],
            self._model,
            self._max_tokens,
            0.0,
        )
        parts: list[str] = []
        async with asyncio.timeout(self._timeout):
            stream = self._llm.stream(request)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    parts.append(chunk.text)
        return "".join(parts).strip()


def _facts(metadata: Mapping[str, Any]) -> list[str]:
    facts = [f"{label}: {metadata[key]}" for key, label in _METADATA_LABELS if metadata.get(key)]
    attributes = metadata.get("attributes") or {}
    facts += [f"{k}: {v}" for k, v in sorted(attributes.items())]
    return facts


def _excerpt(source: Source) -> str:
    return f"{source.label} {source.chunk.heading}\n{source.chunk.text}"


_SPACE = re.compile(r"\s+")


@dataclass
class _Budget:
    left: int
    used: list[int] = field(default_factory=list)

    def take(self, tokens: int) -> bool:
        if tokens > self.left:
            return False
        self.left -= tokens
        self.used.append(tokens)
        return True


class KnowledgeAssembler:
    """System prompt + rules + facts + summary + KB excerpts + budgeted history."""

    def __init__(
        self,
        *,
        system_prompt: str,
        prompt_version: str,
        prompt: PromptSettings,
        kb: KnowledgeBase | None = None,
        summarizer: Summarizer | None = None,
    ) -> None:
        self._system_prompt = system_prompt
        self._version = f"{prompt_version}+{PROMPT_TEMPLATE_VERSION}"
        self._prompt = prompt
        self._kb = kb
        self._summarizer = summarizer

    @property
    def prompt_version(self) -> str:
        """The configured prompt version plus the template's (cache keys use it)."""
        return self._version

    async def assemble(self, request: ContextRequest) -> AssembledContext:
        question = request.message
        route = request.route
        sources: list[Source] = []
        if self._kb is not None and request.kb_version > 0 and question:
            wants = route is None or route.wants_knowledge or route.needs_grounding
            if wants:
                sources = await self._kb.relevant(request.tenant, request.kb_version, question)
        if route is not None and route.needs_grounding and request.kb_version > 0 and not sources:
            return AssembledContext([], fallback=FALLBACK_ANSWER)
        shareable = bool(route is not None and route.cacheable and sources)

        total = self._prompt.context_window - self._prompt.answer_reserve
        head = [self._system_prompt, _RULES]
        if route is not None:
            head.append(f"Routing: this message is {_INTENT_HINTS[route.intent]}.")
        if not shareable:
            facts = _facts(request.session.metadata)
            if facts:
                head.append("Facts about this customer:\n" + "\n".join(facts))
        older = list(request.history)
        fixed = count_tokens("\n\n".join(head)) + MESSAGE_OVERHEAD_TOKENS
        fixed += count_tokens(question) + MESSAGE_OVERHEAD_TOKENS

        # Knowledge-base excerpts, best first, within their share of the budget.
        kb_budget = _Budget(max(0, min(self._prompt.knowledge_tokens, total - fixed)))
        used_sources = [s for s in sources if kb_budget.take(count_tokens(_excerpt(s)) + 1)]
        kb_block = ""
        if used_sources:
            kb_block = "Knowledge base excerpts:\n\n" + "\n\n".join(map(_excerpt, used_sources))
            fixed += count_tokens(kb_block) + 1

        summary_text = ""
        new_summary: dict[str, Any] | None = None
        if not shareable:
            summary_text, new_summary, older = await self._fit_history(
                request.session.summary, older, total - fixed
            )
        else:
            older = []
        if summary_text:
            head.append("Summary of the earlier conversation:\n" + summary_text)
        if kb_block:
            head.append(kb_block)
        messages = [{"role": "system", "content": "\n\n".join(head)}]
        messages += [{"role": m.role, "content": m.text} for m in older]
        messages.append({"role": "user", "content": question})
        return AssembledContext(
            messages,
            sources=tuple(used_sources),
            shareable=shareable,
            summary=new_summary,
            tokens=prompt_tokens(messages),
        )

    async def _fit_history(
        self, summary: Mapping[str, Any], older: list[StoredMessage], budget: int
    ) -> tuple[str, dict[str, Any] | None, list[StoredMessage]]:
        """(summary text for the prompt, new summary to store or None, history kept)."""
        through = int(summary.get("through", 0) or 0)
        text = str(summary.get("text", "") or "")
        pending = [m for m in older if m.turn_number > through or m.turn_number == 0]
        # The stored window may open on an answer (its question was trimmed away);
        # drop such a head first, or "everything fits" never holds and every turn
        # would pay for a summary.
        while pending and pending[0].role != "user":
            pending.pop(0)
        current_cost = count_tokens(text) + 1 if text else 0
        if len(self._newest_that_fit(pending, budget - current_cost)) == len(pending):
            return text, None, pending
        reserve = self._prompt.summary_tokens + 1
        # Some turns do not fit: fold them into the summary, compacting to half the budget.
        kept = self._newest_that_fit(pending, max(0, (budget - reserve) // 2))
        overflow = pending[: len(pending) - len(kept)]
        if not overflow:
            return text, None, kept
        if self._summarizer is None:
            log.info("event=history_truncated dropped=%d", len(overflow))
            note = f"({len(overflow)} earlier messages are not shown.)"
            return (text + "\n" + note).strip(), None, kept
        try:
            new_text = await self._summarizer.summarize(text, overflow)
        except (KoreroError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, KoreroError) else "TIMEOUT"
            log.warning("event=summary_failed reason=%s dropped=%d", reason, len(overflow))
            note = f"({len(overflow)} earlier messages are not shown.)"
            return (text + "\n" + note).strip(), None, kept
        new_text = _SPACE.sub(" ", new_text)[: self._prompt.summary_tokens * 4]
        new_through = max(m.turn_number for m in overflow)
        return new_text, {"through": new_through, "text": new_text}, kept

    @staticmethod
    def _newest_that_fit(messages: list[StoredMessage], budget: int) -> list[StoredMessage]:
        """The longest suffix of `messages` that fits, starting at a user message."""
        left = budget
        start = len(messages)
        for i in range(len(messages) - 1, -1, -1):
            cost = count_tokens(messages[i].text) + MESSAGE_OVERHEAD_TOKENS
            if cost > left:
                break
            left -= cost
            start = i
        # Whole turns only: an answer without its question misleads the model.
        while start < len(messages) and messages[start].role != "user":
            start += 1
        return messages[start:]

"""What the simulated upstream answers: a pure function of the request's messages.

See the package's `_upstream` docstring for the rules (echo, knowledge-base
quotes, summaries, the assistant persona).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from korero.server.context import citations
from korero.sim._assistant import answer_from_tools, detect_intent, guess_intent, intent_reply
from korero.sim._config import ECHO_CHARS, Persona

_BOOKING_REFERENCE = re.compile(r"^[ \t]*Booking reference:[ \t]*(\S+)[ \t]*$", re.MULTILINE)
_CUSTOMER_NAME = re.compile(r"^[ \t]*Customer name:[ \t]*(\S.*?)[ \t]*$", re.MULTILINE)

# Filler vocabulary: plain support-desk English, fixed forever so that
# answers stay stable across releases.
_WORDS: tuple[str, ...] = (
    "account", "after", "again", "also", "answer", "back", "before", "billing",
    "can", "change", "check", "confirm", "could", "customer", "data", "day",
    "detail", "device", "email", "every", "find", "first", "from", "have",
    "help", "here", "issue", "just", "know", "last", "let", "like", "look",
    "make", "message", "more", "need", "next", "note", "number", "order",
    "other", "page", "payment", "plan", "please", "problem", "quick", "reply",
    "request", "reset", "right", "same", "see", "service", "setting", "should",
    "simple", "soon", "step", "still", "support", "sure", "team", "that",
    "then", "there", "this", "time", "today", "try", "update", "usual",
    "value", "very", "wait", "want", "when", "where", "will", "with", "work",
    "would", "your",
)  # fmt: skip


def _content_text(content: object) -> str:
    """The text of a message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _message_texts(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    return [_content_text(m.get("content")) for m in messages if isinstance(m, Mapping)]


def prompt_token_count(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens as the sim counts them: whitespace-separated words of all contents."""
    return sum(len(text.split()) for text in _message_texts(messages))


_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORDLIKE = re.compile(r"[a-z0-9]+")
_CUSTOMER_LINE = re.compile(r"^customer:[ \t]*(.+)$", re.MULTILINE)
_EARLIER = re.compile(
    r"^Earlier summary: Summary: the customer asked about (.*?)\.?$", re.MULTILINE
)


def _as_tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text)


def _quote_excerpts(question: str, excerpts: list[tuple[str, str]], name: str | None) -> str:
    asked = set(_WORDLIKE.findall(question.lower()))
    lines = [f"Thanks, {name}. " if name else "", "Here is what our policy says:"]
    for label, body in excerpts[:2]:
        sentences = [s.strip() for s in _SENTENCE.split(" ".join(body.split())) if s.strip()]
        ranked = sorted(
            range(len(sentences)),
            key=lambda i: (-len(asked & set(_WORDLIKE.findall(sentences[i].lower()))), i),
        )
        chosen = " ".join(sentences[i] for i in sorted(ranked[:2]))
        lines.append(f"\n- {chosen} {label}")
    return "".join(lines)


def _summarize(transcript: str) -> str:
    asks = [" ".join(m.split()[:4]) for m in _CUSTOMER_LINE.findall(transcript)]
    earlier = _EARLIER.search(transcript)
    if earlier:  # a rolling summary keeps what the previous one said
        asks.insert(0, earlier.group(1).strip())
    return "Summary: the customer asked about " + "; ".join(asks or ["nothing yet"]) + "."


def compose_answer(
    messages: Sequence[Mapping[str, Any]],
    answer_tokens: int,
    quote_tokens: int = 120,
    persona: Persona = "echo",
) -> list[str]:
    """The answer to `messages` as tokens (words with their leading space).

    See the module docstring for how the text is built.
    """
    texts = _message_texts(messages)
    first_system = next(
        (
            _content_text(m.get("content"))
            for m in messages
            if isinstance(m, Mapping) and m.get("role") == "system"
        ),
        "",
    )
    if first_system.startswith("Summarize"):
        return _as_tokens(_summarize("\n".join(texts[1:])))[: max(answer_tokens, quote_tokens)]
    from_tools = answer_from_tools(messages)
    if from_tools is not None:
        return _as_tokens(from_tools)
    excerpts = [(m.group(1), m.group(2)) for t in texts for m in citations.EXCERPT.finditer(t)]
    last_user = ""
    name = None
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        text = _content_text(message.get("content"))
        if message.get("role") == "user":
            last_user = text
        if name is None and (match := _CUSTOMER_NAME.search(text)):
            name = " ".join(match.group(1).split())

    if excerpts:
        quoted = _quote_excerpts(last_user, excerpts, name)
        return _as_tokens(quoted)[: max(answer_tokens, quote_tokens)]
    if persona == "assistant":
        intent = detect_intent(messages) or guess_intent(last_user)
        booking = _BOOKING_REFERENCE.search(first_system)
        reply = intent_reply(intent, last_user, name, booking.group(1) if booking else "")
        return _as_tokens(reply)

    echo = " ".join(last_user.split())[:ECHO_CHARS].rstrip()
    words = ["You", "asked:", *f'"{echo}".'.split(" ")]
    if name:
        words += ["Thanks,", *f"{name}.".split(" ")]

    filler_count = max(0, answer_tokens - len(words))
    if filler_count:
        canonical = json.dumps(
            messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
        )
        digest = hashlib.shake_256(canonical.encode()).digest(2 * filler_count)
        filler = [
            _WORDS[int.from_bytes(digest[2 * i : 2 * i + 2], "big") % len(_WORDS)]
            for i in range(filler_count)
        ]
        filler[-1] += "."
        words += filler

    words = words[:answer_tokens]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]

"""Routing: what kind of message a user sent, and what the turn should do about it.

`RuleRouter` is deterministic: weighted patterns per intent, summed; the best
intent wins and the margin over the runner-up gives the confidence. Every
matched pattern is named in `RouteDecision.reasons`, so a decision can be
explained (and asserted in tests). Anything that implements `IntentRouter`
(e.g. a model-based classifier) can replace it.

Besides the intent, the router flags what makes an answer unsafe to share
between customers: personal data in the message (`personal`) and references
to earlier turns (`follow_up`). Only a policy question with neither, asked
with enough confidence, is `cacheable`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "INTENTS",
    "Intent",
    "IntentRouter",
    "RouteDecision",
    "RuleRouter",
]

Intent = Literal["policy_question", "booking_lookup", "small_talk", "human_request", "complaint"]
INTENTS: tuple[Intent, ...] = (
    "human_request",
    "complaint",
    "booking_lookup",
    "policy_question",
    "small_talk",
)
"""All intents; on equal scores the earlier one wins (a human request beats everything)."""

CACHEABLE_CONFIDENCE = 0.5
"""Below this confidence a policy question is answered but not cached."""


@dataclass(frozen=True)
class RouteDecision:
    """How a message was classified, and why."""

    intent: Intent
    confidence: float
    reasons: tuple[str, ...] = ()
    personal: bool = False
    """The message carries personal data (a booking, a name, "my flight", health, contact)."""
    follow_up: bool = False
    """The message leans on earlier turns ("and for infants?", "is that refundable?")."""
    wants_knowledge: bool = False
    """The message touches a knowledge-base topic, whatever its intent."""

    @property
    def needs_grounding(self) -> bool:
        """A policy answer must come from the knowledge base, or not at all."""
        return self.intent == "policy_question"

    @property
    def cacheable(self) -> bool:
        """The answer depends only on the question and the knowledge base."""
        return (
            self.intent == "policy_question"
            and not self.personal
            and not self.follow_up
            and self.confidence >= CACHEABLE_CONFIDENCE
        )


class IntentRouter(Protocol):
    """Classifies one user message. Must not raise for any text."""

    async def route(self, text: str) -> RouteDecision: ...


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


# (intent, reason, weight, pattern)
_RULES: tuple[tuple[Intent, str, float, re.Pattern[str]], ...] = (
    (
        "human_request",
        "asks for a person",
        3.0,
        _rx(
            r"\b(human|real person|live (agent|chat|person)|(an? |to an? |your )?agent|"
            r"representative|operator|supervisor|manager|someone real|actual person)\b"
        ),
    ),
    (
        "human_request",
        "wants to talk",
        1.0,
        _rx(r"\b(speak|talk|chat) (to|with)\b|\bcall me\b|\bput me through\b"),
    ),
    (
        "complaint",
        "negative words",
        2.0,
        _rx(
            r"\b(terrible|awful|horrible|worst|unacceptable|disgusting|ridiculous|useless|"
            r"appalling|outrageous|pathetic|scam|rude|furious|angry|fed up|disappointed|"
            r"disappointing|shocking|incompetent|hopeless|joke)\b"
        ),
    ),
    ("complaint", "complains", 2.0, _rx(r"\bcomplain(t|ts|ing)?\b|\bnever (fly|flying) (with )?")),
    ("complaint", "shouting", 1.0, re.compile(r"!{2,}|\b[A-Z]{5,}\b(?:\s+\b[A-Z]{3,}\b){1,}")),
    (
        "booking_lookup",
        "booking reference",
        2.5,
        re.compile(r"\b(?=[A-Z0-9]{6}\b)(?=[A-Z0-9]*\d)(?=[A-Z0-9]*[A-Z])[A-Z0-9]{6}\b"),
    ),
    ("booking_lookup", "flight number", 2.0, re.compile(r"\b[A-Z]{2}\s?\d{2,4}\b")),
    (
        "booking_lookup",
        "their booking",
        1.5,
        _rx(r"\bmy (booking|reservation|itinerary|ticket|seat|trip|flight|confirmation)s?\b"),
    ),
    (
        "booking_lookup",
        "status or lookup",
        1.5,
        _rx(
            r"\b(status of|is my|when does my|what time does my|which gate|gate number|"
            r"look ?up|find my|where is my|on time|delayed\?)"
        ),
    ),
    (
        "policy_question",
        "policy topic",
        2.0,
        _rx(
            r"\b(baggage|luggage|bags?|suitcase|carry[- ]?on|cabin|allowance|kg|weight|liquids?|"
            r"batter(y|ies)|power ?banks?|refunds?|refundable|cancel(l?ation|l?ed|l?ing)?|"
            r"change fees?|fees?|fare|check[- ]?in|boarding|bag drop|passports?|visas?|"
            r"wheelchairs?|assistance|mobility|medical|oxygen|pregnan(t|cy)|infants?|bab(y|ies)|"
            r"children|child|minors?|strollers?|pets?|dogs?|rewards?|loyalty|points?|tiers?|"
            r"status credits|lounges?|instruments?|golf|skis?|surfboards?|bicycles?|bikes?|"
            r"compensation|lost|damaged|delayed bags?|upgrades?|seats?)\b"
        ),
    ),
    (
        "policy_question",
        "asks how or what",
        1.0,
        _rx(
            r"^\s*(what|how|can|may|do|does|is|are|when|where|which|why|will|should|could)\b|"
            r"\?\s*$|\b(allowed|policy|rules?|how much|how many|how long|how early)\b"
        ),
    ),
    (
        "small_talk",
        "greeting or thanks",
        2.0,
        _rx(
            r"^\s*(hi|hello|hey|kia ora|good (morning|afternoon|evening)|thanks|thank you|"
            r"cheers|bye|goodbye|ok(ay)?|cool|great|nice)\b"
        ),
    ),
    (
        "small_talk",
        "chit-chat",
        2.0,
        _rx(r"\b(how are you|who are you|what('?s| is) your name|are you a (bot|robot)|joke)\b"),
    ),
)

_PERSONAL: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("possessive", _rx(r"\b(my|mine|our)\b")),
    ("about themselves", _rx(r"\b(i'?m|i am|i'?ve|i have|i was|i had|we'?re|we are|me)\b")),
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b")),
    ("phone or card number", re.compile(r"\+?\d[\d\s-]{6,}\d")),
    (
        "booking reference",
        re.compile(r"\b(?=[A-Z0-9]{6}\b)(?=[A-Z0-9]*\d)(?=[A-Z0-9]*[A-Z])[A-Z0-9]{6}\b"),
    ),
    ("flight number", re.compile(r"\b[A-Z]{2}\s?\d{2,4}\b")),
)

_FOLLOW_UP = _rx(
    r"^\s*(and|also|but|so|then|what about|how about|same for)\b|"
    r"\b(it|that|this|those|these|they|them)\b(?!.*\b(baggage|bag|fare|flight)\b)"
)
_WORD = re.compile(r"\w+")


class RuleRouter:
    """A deterministic, explainable router built from weighted patterns."""

    async def route(self, text: str) -> RouteDecision:
        return self.classify(text)

    def classify(self, text: str) -> RouteDecision:
        """The decision for `text` (synchronous; `route` wraps it)."""
        scores: dict[Intent, float] = dict.fromkeys(INTENTS, 0.0)
        reasons: list[str] = []
        for intent, reason, weight, pattern in _RULES:
            if pattern.search(text):
                scores[intent] += weight
                reasons.append(f"{intent}: {reason}")
        words = len(_WORD.findall(text))
        if scores["small_talk"] and words > 6 and scores["policy_question"] >= 2:
            # "Hi, how many bags can I check?" is a question with a greeting.
            scores["small_talk"] = 0.5
        if not any(scores.values()):
            scores["small_talk" if words <= 3 else "policy_question"] = 0.5
            reasons.append("no pattern matched: " + ("short" if words <= 3 else "a question"))
        ranked = sorted(INTENTS, key=lambda i: (-scores[i], INTENTS.index(i)))
        best, second = scores[ranked[0]], scores[ranked[1]]
        confidence = round(best / (best + second + 0.5), 3)
        personal = [name for name, pattern in _PERSONAL if pattern.search(text)]
        reasons += [f"personal: {name}" for name in personal]
        follow_up = bool(_FOLLOW_UP.search(text))
        if follow_up:
            reasons.append("follow-up: refers to earlier turns")
        return RouteDecision(
            intent=ranked[0],
            confidence=confidence,
            reasons=tuple(reasons),
            personal=bool(personal),
            follow_up=follow_up,
            wants_knowledge=scores["policy_question"] >= 2,
        )

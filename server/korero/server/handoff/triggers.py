"""What hands a conversation to a human, and what the bot says when it does.

`EscalationPolicy.evaluate` looks at one customer message in the light of
the turns before it (read from the stored history, so it works whichever
instance served them) and returns the first trigger that fires, in this
order: an explicit request for a person, a complaint, negative sentiment
(one message, or the trend), repeated fallback answers, then repeated low
router confidence. Each trigger can be switched off (`KORERO_HANDOFF_TRIGGERS`)
and its threshold is a setting. The two remaining triggers do not come from
a message: the client's `RequestHandoff` and an agent picking the
conversation at the desk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from korero.chat.v1 import chat_pb2 as pb
from korero.server.context.assembly import FALLBACK_ANSWER
from korero.server.context.router import RouteDecision
from korero.server.handoff.sentiment import SentimentReading
from korero.server.settings import HandoffSettings, HandoffTriggerName
from korero.server.storage.records import StoredMessage

__all__ = ["TRIGGERS", "Escalation", "EscalationPolicy", "Trigger"]


@dataclass(frozen=True)
class Trigger:
    """One kind of handoff: its setting name, its proto value, and the bot's words."""

    name: HandoffTriggerName
    proto: pb.HandoffTrigger.ValueType
    says: str


TRIGGERS: dict[HandoffTriggerName, Trigger] = {
    t.name: t
    for t in (
        Trigger(
            "human_request",
            pb.HANDOFF_TRIGGER_HUMAN_REQUEST,
            "Of course. I'm connecting you with a member of our team now; "
            "please stay here and they'll join this chat shortly.",
        ),
        Trigger(
            "complaint",
            pb.HANDOFF_TRIGGER_COMPLAINT,
            "I'm sorry, that isn't the experience we want for you. I'm bringing in a "
            "member of our team who can look into this properly; they'll join this chat shortly.",
        ),
        Trigger(
            "sentiment",
            pb.HANDOFF_TRIGGER_NEGATIVE_SENTIMENT,
            "I can tell this has been frustrating, so I'm bringing in a member of our team "
            "to help you directly; they'll join this chat shortly.",
        ),
        Trigger(
            "fallback",
            pb.HANDOFF_TRIGGER_REPEATED_FALLBACK,
            "I haven't been able to find what you need, so I'm connecting you with a member "
            "of our team; they'll join this chat shortly.",
        ),
        Trigger(
            "low_confidence",
            pb.HANDOFF_TRIGGER_LOW_CONFIDENCE,
            "I'm not sure I'm understanding you correctly, so I'm connecting you with a member "
            "of our team; they'll join this chat shortly.",
        ),
        Trigger(
            "client_request",
            pb.HANDOFF_TRIGGER_CLIENT_REQUEST,
            "I'm connecting you with a member of our team; they'll join this chat shortly.",
        ),
        Trigger("agent_pick", pb.HANDOFF_TRIGGER_AGENT_PICK, ""),
    )
}


def trigger_of(proto: int) -> Trigger | None:
    return next((t for t in TRIGGERS.values() if t.proto == proto), None)


@dataclass(frozen=True)
class Escalation:
    """A trigger fired: what, why (for the agent), and what the bot says."""

    trigger: Trigger
    reason: str

    @property
    def message(self) -> str:
        return self.trigger.says


class EscalationPolicy:
    """Decides, per customer message, whether a human should take over."""

    def __init__(self, settings: HandoffSettings) -> None:
        self._s = settings
        self._on = frozenset(settings.triggers) if settings.enabled else frozenset()

    def enabled(self, name: HandoffTriggerName) -> bool:
        return name in self._on

    def evaluate(  # noqa: PLR0911 - one return per trigger, in priority order
        self,
        route: RouteDecision | None,
        sentiment: SentimentReading | None,
        history: Sequence[StoredMessage],
        *,
        fallback: bool = False,
    ) -> Escalation | None:
        """The escalation this message causes, if any.

        `history` holds the earlier messages (oldest first, without this
        one); `fallback` says this turn's answer would be the fallback.
        """
        s = self._s
        if route is not None and route.intent == "human_request" and self.enabled("human_request"):
            return Escalation(TRIGGERS["human_request"], "the customer asked for a person")
        if route is not None and route.intent == "complaint" and self.enabled("complaint"):
            why = [r.split(": ", 1)[1] for r in route.reasons if r.startswith("complaint:")]
            return Escalation(TRIGGERS["complaint"], "complaint (" + ", ".join(why) + ")")
        if sentiment is not None and self.enabled("sentiment"):
            if sentiment.score <= s.sentiment_message:
                return Escalation(
                    TRIGGERS["sentiment"],
                    f"very negative message (sentiment {sentiment.score:+.2f})",
                )
            if sentiment.window >= 2 and sentiment.trend <= s.sentiment_trend:
                return Escalation(
                    TRIGGERS["sentiment"],
                    f"sentiment trending negative ({sentiment.trend:+.2f} over the last "
                    f"{sentiment.window} messages)",
                )
        if fallback and self.enabled("fallback") and s.fallbacks > 0:
            earlier = _fallbacks_in_a_row(history)
            if earlier + 1 >= s.fallbacks:
                return Escalation(
                    TRIGGERS["fallback"],
                    f"the bot could not answer {earlier + 1} times in a row",
                )
        if (
            route is not None
            and route.confidence < s.low_confidence
            and self.enabled("low_confidence")
            and s.low_confidence_turns > 0
        ):
            earlier = _unsure_in_a_row(history, s.low_confidence)
            if earlier + 1 >= s.low_confidence_turns:
                return Escalation(
                    TRIGGERS["low_confidence"],
                    f"the router was unsure {earlier + 1} times in a row "
                    f"(confidence {route.confidence:.2f})",
                )
        return None


def _fallbacks_in_a_row(history: Sequence[StoredMessage]) -> int:
    """Bot answers that were the fallback, counting back from the latest answer."""
    count = 0
    for message in reversed(history):
        if message.role != "assistant" or message.agent:
            continue
        if message.text != FALLBACK_ANSWER:
            break
        count += 1
    return count


def _unsure_in_a_row(history: Sequence[StoredMessage], below: float) -> int:
    """Customer messages the router was unsure of, counting back from the latest."""
    count = 0
    for message in reversed(history):
        if message.role != "user":
            continue
        if message.confidence is None or message.confidence >= below:
            break
        count += 1
    return count

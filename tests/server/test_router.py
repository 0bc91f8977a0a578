"""The rule router on a table of real-looking messages."""

from __future__ import annotations

import pytest

from korero.server.context.router import RuleRouter

ROUTER = RuleRouter()

# (message, intent, cacheable)
TABLE = [
    ("What's the checked baggage allowance?", "policy_question", True),
    ("How much does it cost to add an extra bag?", "policy_question", True),
    ("Can I bring a power bank in my carry-on?", "policy_question", False),
    ("When does online check-in open?", "policy_question", True),
    ("are liquids allowed in the cabin", "policy_question", True),
    ("How long do refunds take to reach a credit card?", "policy_question", True),
    ("Do Aotea points expire?", "policy_question", True),
    ("What's the baggage allowance for my flight to Auckland?", "policy_question", False),
    ("I'm 30 weeks pregnant, can I still fly?", "policy_question", False),
    ("Is that refundable?", "policy_question", False),
    ("And for infants?", "policy_question", False),
    ("What's the status of booking QX7K2P?", "booking_lookup", False),
    ("Is my flight NZ101 on time?", "booking_lookup", False),
    ("where is my booking confirmation", "booking_lookup", False),
    ("hi", "small_talk", False),
    ("Thanks, that's great", "small_talk", False),
    ("how are you today?", "small_talk", False),
    ("I want to speak to a real person", "human_request", False),
    ("Can I talk to an agent please", "human_request", False),
    ("get me a human", "human_request", False),
    ("This is ridiculous, worst airline ever!!", "complaint", False),
    ("I want to make a complaint about the rude staff", "complaint", False),
    ("Your service is useless and I'm fed up", "complaint", False),
]


@pytest.mark.parametrize(("text", "intent", "cacheable"), TABLE)
async def test_router_classifies_real_looking_messages(
    text: str, intent: str, cacheable: bool
) -> None:
    decision = await ROUTER.route(text)
    assert decision.intent == intent, decision.reasons
    assert decision.cacheable is cacheable, decision.reasons
    assert 0 < decision.confidence < 1
    assert any(r.startswith(intent) for r in decision.reasons) or "no pattern" in str(
        decision.reasons
    )


def test_personal_data_is_flagged_and_never_cacheable() -> None:
    for text in (
        "What's the checked baggage allowance? my email is aroha@example.com",
        "Baggage allowance for booking AB12CD?",
        "Baggage allowance on NZ 402?",
        "Baggage allowance, call me on +64 21 555 0199",
    ):
        decision = ROUTER.classify(text)
        assert decision.personal, text
        assert not decision.cacheable, text
        assert any(r.startswith("personal:") for r in decision.reasons)


def test_routing_is_deterministic_and_confidence_reflects_the_margin() -> None:
    clear = ROUTER.classify("What is the checked baggage allowance for Economy Flex fares?")
    vague = ROUTER.classify("what about it")
    assert clear == ROUTER.classify("What is the checked baggage allowance for Economy Flex fares?")
    assert clear.confidence > vague.confidence
    assert clear.wants_knowledge
    assert clear.needs_grounding


def test_a_question_with_a_greeting_is_still_a_question() -> None:
    decision = ROUTER.classify("Hi there, how many checked bags can I take on Economy Standard?")
    assert decision.intent == "policy_question"
    assert decision.cacheable

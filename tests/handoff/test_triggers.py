"""Every trigger, on its own: the policy's rules, then each one end to end on a server."""

from __future__ import annotations

import dataclasses

import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.context.assembly import FALLBACK_ANSWER
from korero.server.context.router import RouteDecision, RuleRouter
from korero.server.handoff.sentiment import SentimentAnalyzer, SentimentReading
from korero.server.handoff.triggers import EscalationPolicy
from korero.server.settings import HandoffSettings, Settings
from korero.server.storage.records import StoredMessage
from tests.handoff.conftest import FAST
from tests.handoff.desk import Agent
from tests.helpers import ingest_sample, kinds, run_turn, text_of

ROUTER = RuleRouter()


def _user(text: str, confidence: float = 0.9) -> StoredMessage:
    return StoredMessage("user", text, "t1", "c", 0.0, confidence=confidence)


def _bot(text: str) -> StoredMessage:
    return StoredMessage("assistant", text, "t1", "", 0.0)


def _calm() -> SentimentReading:
    return SentimentReading(0.0, 0.0, 1)


@pytest.mark.parametrize(
    ("text", "trigger"),
    [
        ("Can I speak to a human agent please", "human_request"),
        ("This is ridiculous, worst airline ever", "complaint"),
    ],
)
def test_intent_triggers(text: str, trigger: str) -> None:
    found = EscalationPolicy(HandoffSettings()).evaluate(ROUTER.classify(text), _calm(), [])
    assert found is not None
    assert found.trigger.name == trigger


def test_each_trigger_can_be_switched_off() -> None:
    route = ROUTER.classify("Can I speak to a human agent please")
    off = HandoffSettings(triggers=("complaint",))
    assert EscalationPolicy(off).evaluate(route, _calm(), []) is None
    assert EscalationPolicy(HandoffSettings(enabled=False)).evaluate(route, _calm(), []) is None


def test_sentiment_message_and_trend() -> None:
    policy = EscalationPolicy(HandoffSettings())
    route = RouteDecision("policy_question", 0.9)
    one = policy.evaluate(route, SentimentReading(-0.9, -0.9, 1), [])
    assert one is not None
    assert one.trigger.name == "sentiment"
    assert "very negative" in one.reason
    trend = policy.evaluate(route, SentimentReading(-0.5, -0.45, 3), [])
    assert trend is not None
    assert "trending negative" in trend.reason
    assert policy.evaluate(route, SentimentReading(-0.5, -0.5, 1), []) is None  # one message
    assert policy.evaluate(route, SentimentReading(-0.3, -0.3, 3), []) is None


def test_fallbacks_in_a_row() -> None:
    policy = EscalationPolicy(HandoffSettings(fallbacks=2))
    route = RouteDecision("policy_question", 0.9)
    assert policy.evaluate(route, _calm(), [], fallback=True) is None
    earlier = [_user("q"), _bot(FALLBACK_ANSWER)]
    found = policy.evaluate(route, _calm(), earlier, fallback=True)
    assert found is not None
    assert found.trigger.name == "fallback"
    # an answer in between resets the count
    reset = [_user("q"), _bot(FALLBACK_ANSWER), _user("q2"), _bot("Here you go")]
    assert policy.evaluate(route, _calm(), reset, fallback=True) is None


def test_low_confidence_in_a_row() -> None:
    policy = EscalationPolicy(HandoffSettings(low_confidence=0.5, low_confidence_turns=3))
    unsure = RouteDecision("small_talk", 0.4)
    assert policy.evaluate(unsure, _calm(), [_user("a", 0.45)]) is None
    found = policy.evaluate(unsure, _calm(), [_user("a", 0.45), _bot("x"), _user("b", 0.3)])
    assert found is not None
    assert found.trigger.name == "low_confidence"
    assert policy.evaluate(unsure, _calm(), [_user("a", 0.45), _user("b", 0.9)]) is None


# End to end --------------------------------------------------------------------------------


async def _escalated(conversation, text: str) -> pb.HandoffRequested | None:  # type: ignore[no-untyped-def]
    events = await run_turn(conversation, text)
    assert kinds(events)[-1] == "done"
    found = [e.handoff_requested for e in events if e.WhichOneof("kind") == "handoff_requested"]
    return found[0] if found else None


async def _queued(conversation) -> pb.Event:  # type: ignore[no-untyped-def]
    while True:
        event = await conversation.next_notification(10)
        if event.WhichOneof("kind") == "handoff_queued":
            return event


async def test_human_request_end_to_end(start_server, sim) -> None:  # type: ignore[no-untyped-def]
    app = await start_server()
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        conversation = await client.conversation()
        before = len(sim.requests)
        requested = await _escalated(conversation, "I want to talk to a real person")
        assert requested is not None
        assert requested.trigger == pb.HANDOFF_TRIGGER_HUMAN_REQUEST
        assert len(sim.requests) == before
        assert (await _queued(conversation)).handoff_queued.position == 1


async def test_negative_message_end_to_end(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server()
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        conversation = await client.conversation()
        requested = await _escalated(
            conversation, "This is so sad and bad, nothing works and I hate it"
        )
        assert requested is not None
        assert requested.trigger == pb.HANDOFF_TRIGGER_NEGATIVE_SENTIMENT
        assert "very negative" in requested.reason


async def test_sentiment_trend_end_to_end(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server()
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        conversation = await client.conversation()
        first = await run_turn(conversation, "not great")
        assert first[0].turn_started.sentiment.window == 1
        assert not [e for e in first if e.WhichOneof("kind") == "handoff_requested"]
        events = await run_turn(conversation, "this is bad")
        started = events[0].turn_started
        assert started.sentiment.window == 2
        assert started.sentiment.trend == pytest.approx(
            (first[0].turn_started.sentiment.score + started.sentiment.score) / 2, abs=1e-3
        )
        requested = [e for e in events if e.WhichOneof("kind") == "handoff_requested"]
        assert requested[0].handoff_requested.trigger == pb.HANDOFF_TRIGGER_NEGATIVE_SENTIMENT
        assert "trending negative" in requested[0].handoff_requested.reason


async def test_repeated_fallback_end_to_end(start_server, redis_url) -> None:  # type: ignore[no-untyped-def]
    await ingest_sample(redis_url)
    app = await start_server()
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        conversation = await client.conversation()
        first = await run_turn(conversation, "What is the policy on purple elephants?")
        assert text_of(first) == FALLBACK_ANSWER
        requested = await _escalated(conversation, "What are the rules for xylophone tuning?")
        assert requested is not None
        assert requested.trigger == pb.HANDOFF_TRIGGER_REPEATED_FALLBACK
        assert "2 times in a row" in requested.reason


async def test_low_confidence_end_to_end(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server(
        handoff=dataclasses.replace(FAST, low_confidence=0.45, low_confidence_turns=2)
    )
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        conversation = await client.conversation()
        assert await _escalated(conversation, "hi my dog") is None
        requested = await _escalated(conversation, "ok my seat")
        assert requested is not None
        assert requested.trigger == pb.HANDOFF_TRIGGER_LOW_CONFIDENCE


async def test_complaint_end_to_end_and_switched_off(start_server, sim) -> None:  # type: ignore[no-untyped-def]
    app = await start_server()
    off = await start_server(handoff=dataclasses.replace(FAST, triggers=("human_request",)))
    text = "Your service is terrible and the staff were rude"
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        requested = await _escalated(await client.conversation(), text)
        assert requested is not None
        assert requested.trigger == pb.HANDOFF_TRIGGER_COMPLAINT
    async with ChatClient(f"127.0.0.1:{off.port}") as client:
        before = len(sim.requests)
        assert await _escalated(await client.conversation(), text) is None
        assert len(sim.requests) == before + 1  # switched off: the bot answers


async def test_client_request_end_to_end(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server()
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        conversation = await client.conversation()
        await run_turn(conversation, "hello")
        await conversation.request_handoff("I'd rather talk to someone")
        requested = await conversation.next_notification(10)
        assert requested.WhichOneof("kind") == "handoff_requested"
        assert requested.handoff_requested.trigger == pb.HANDOFF_TRIGGER_CLIENT_REQUEST
        assert "rather talk to someone" in requested.handoff_requested.reason
        assert requested.handoff_requested.message  # the bot says so in plain words
        queued = await _queued(conversation)
        assert queued.seq > requested.seq
        relayed = await run_turn(conversation, "still there?")
        assert kinds(relayed) == ["message_relayed"]


async def test_client_request_refused_when_switched_off(start_server) -> None:  # type: ignore[no-untyped-def]
    app = await start_server(handoff=dataclasses.replace(FAST, triggers=("complaint",)))
    async with ChatClient(f"127.0.0.1:{app.port}") as client:
        conversation = await client.conversation()
        await conversation.request_handoff()
        events = await run_turn(conversation, "hello")
        errors = [e for e in events if e.WhichOneof("kind") == "error"]
        assert errors[0].error.reason == "HANDOFF_UNAVAILABLE"


async def test_agent_pick_end_to_end(start_server, sim) -> None:  # type: ignore[no-untyped-def]
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    agent = Agent(target, "a1", "Mere")
    await agent.connect()
    async with ChatClient(target) as client:
        conversation = await client.conversation()
        await run_turn(conversation, "How many bags can I check?")
        await agent.pick(conversation.session_id, "watching this one")
        assigned = await agent.expect("assigned")
        assert assigned.assigned.context.trigger == pb.HANDOFF_TRIGGER_AGENT_PICK
        requested = await conversation.next_notification(10)
        assert requested.handoff_requested.trigger == pb.HANDOFF_TRIGGER_AGENT_PICK
        joined = await conversation.next_notification(10)
        assert joined.agent_joined.agent_display_name == "Mere"
        before = len(sim.requests)
        assert kinds(await run_turn(conversation, "oh hi")) == ["message_relayed"]
        assert len(sim.requests) == before
        await agent.expect("customer_message", text="oh hi")
    await agent.close()


def test_settings_parse_triggers_and_scores() -> None:
    settings = Settings.from_env(
        {
            "KORERO_HANDOFF_TRIGGERS": "complaint, sentiment",
            "KORERO_HANDOFF_SENTIMENT_TREND": "-0.6",
        }
    )
    assert settings.handoff.triggers == ("sentiment", "complaint")
    assert settings.handoff.sentiment_trend == -0.6
    assert Settings.from_env({"KORERO_HANDOFF_TRIGGERS": "none"}).handoff.triggers == ()
    with pytest.raises(ValueError, match="unknown triggers"):
        Settings.from_env({"KORERO_HANDOFF_TRIGGERS": "moon_phase"})
    with pytest.raises(ValueError, match="between -1 and 1"):
        Settings.from_env({"KORERO_HANDOFF_SENTIMENT_MESSAGE": "-3"})


def test_numbers_carry_no_sentiment() -> None:
    """VADER reads "187" as slang (-0.62); flight numbers and prices say nothing about mood."""
    analyzer = SentimentAnalyzer()
    assert analyzer.score("conversation 187 question 1") == 0.0
    assert analyzer.score("I paid $187.50 and it was great") > 0.5
    assert analyzer.score("This is the third time my bag was lost, I am furious!!") < -0.7

"""Context engineering end to end: routing, retrieval, citations, fallback, budget, summaries."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.server.context.assembly import (
    FALLBACK_ANSWER,
    ContextRequest,
    KnowledgeAssembler,
    prompt_tokens,
)
from korero.server.settings import PromptSettings, Settings
from korero.server.storage.records import SessionRecord, StoredMessage
from korero.sim import UpstreamSim
from tests.conftest import RedisProcess, make_settings
from tests.helpers import ingest_sample, kinds, of_kind, run_turn, text_of


@pytest.fixture
async def kb_client(redis_url: str, settings: Settings) -> AsyncIterator[ChatClient]:
    await ingest_sample(redis_url)
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            yield client
    finally:
        await app.shutdown(grace=0)


def _answer_requests(sim: UpstreamSim) -> list[list[dict[str, str]]]:
    return [
        r.body["messages"]
        for r in sim.requests
        if not r.body["messages"][0]["content"].startswith("Summarize")
    ]


async def test_a_kb_question_is_answered_from_the_kb_with_citations(
    kb_client: ChatClient, sim: UpstreamSim, redis_proc: RedisProcess
) -> None:
    conversation = await kb_client.conversation()
    events = await run_turn(conversation, "What's the checked baggage allowance?")

    started = events[0].turn_started
    assert started.intent == "policy_question"
    assert started.model == "korero-sim-1 (simulated)"
    order = kinds(events)
    assert order[0] == "turn_started"
    assert order[-2:] == ["usage", "done"]
    citations = [e.citation for e in of_kind(events, "citation")]
    assert citations, order
    assert order.index("citation") > order.index("text_delta")
    top = citations[0]
    assert (top.document_title, top.document_id, top.section) == (
        "Baggage Policy",
        "baggage",
        "2.1",
    )
    assert "23 kg" in top.snippet
    assert 0 < top.score <= 1

    answer = text_of(events)
    assert "[Source: Baggage Policy, Section 2.1]" in answer
    assert "Economy Standard fares include one checked bag of up to 23 kg" in answer
    system = sim.requests[-1].body["messages"][0]["content"]
    assert "cite its source" in system
    assert "[Source: Baggage Policy, Section 2.1] Checked baggage allowance" in system

    # The router's decision is stored with the message.
    raw = redis_proc.client().lrange(f"kr:{{default:{conversation.session_id}}}:history", 0, 0)
    assert json.loads(raw[0])["intent"] == "policy_question"


async def test_a_personal_question_keeps_customer_facts_and_kb(
    kb_client: ChatClient, sim: UpstreamSim
) -> None:
    meta = pb.SessionMetadata(customer_name="Aroha", booking_reference="KR7Q2X")
    conversation = await kb_client.conversation(metadata=meta)
    events = await run_turn(conversation, "What's the baggage allowance for my flight to Auckland?")
    system = sim.requests[-1].body["messages"][0]["content"]
    assert "Booking reference: KR7Q2X" in system
    assert "Section 2.1]" in system
    assert text_of(events).startswith("Thanks, Aroha.")
    assert of_kind(events, "citation")
    assert not events[-1].done.cached


async def test_no_relevant_kb_chunk_gives_the_safe_fallback_without_calling_the_model(
    kb_client: ChatClient, sim: UpstreamSim
) -> None:
    conversation = await kb_client.conversation()
    events = await run_turn(conversation, "Can I take fireworks on the plane?")
    assert text_of(events) == FALLBACK_ANSWER
    assert not of_kind(events, "citation")
    assert events[-1].done.finish_reason == pb.FINISH_REASON_STOP
    assert sim.requests == []  # no model call, so no invented policy


async def test_small_talk_and_human_requests_are_routed(
    kb_client: ChatClient, sim: UpstreamSim
) -> None:
    conversation = await kb_client.conversation()
    hello = await run_turn(conversation, "hello!")
    asked = len(sim.requests)
    human = await run_turn(conversation, "I want to talk to a real person")
    assert hello[0].turn_started.intent == "small_talk"
    assert human[0].turn_started.intent == "human_request"
    # A request for a person is handed to the agent desk (handoff/), not to the model.
    assert of_kind(human, "handoff_requested")
    assert len(sim.requests) == asked


def _message(role: str, n: int, text: str) -> StoredMessage:
    return StoredMessage(role, text, f"t{n}", f"c{n}" if role == "user" else "", 0.0)  # type: ignore[arg-type]


async def test_the_prompt_stays_within_the_budget_under_a_long_history() -> None:
    prompt = PromptSettings(context_window=2000, answer_reserve=500)
    assembler = KnowledgeAssembler(system_prompt="Be helpful.", prompt_version="v1", prompt=prompt)
    history = []
    for n in range(1, 101):
        history.append(_message("user", n, f"question {n} " + "blah " * 60))
        history.append(_message("assistant", n, f"answer {n} " + "words " * 80))
    session = SessionRecord("t", "s", {"customer_name": "Aroha"}, 0, 0, 0, 101, 201)
    built = await assembler.assemble(ContextRequest("t", session, "the newest question", history))
    assert prompt_tokens(built.messages) == built.tokens <= 1500
    contents = [m["content"] for m in built.messages]
    assert contents[-1] == "the newest question"
    assert contents[-2].startswith("answer 100 ")  # newest turns kept, whole turns only
    assert built.messages[1]["role"] == "user"
    assert not any(c.startswith("question 1 ") for c in contents)
    assert "earlier messages are not shown" in contents[0]  # no summarizer: said, not silent


async def test_older_turns_are_summarized_through_the_llm_and_the_summary_is_reused(
    redis_url: str, sim: UpstreamSim, redis_proc: RedisProcess
) -> None:
    settings = make_settings(
        redis_url,
        sim.base_url,
        prompt__context_window=900,
        prompt__answer_reserve=100,
        prompt__summary_tokens=80,
        engine__prompt_history_messages=60,
    )
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            turns = 10
            for n in range(turns):
                events = await run_turn(
                    conversation, f"topic-{n} please remember this note " + "lorem ipsum " * 20
                )
                assert kinds(events)[-1] == "done"
    finally:
        await app.shutdown(grace=0)

    summaries = [
        r for r in sim.requests if r.body["messages"][0]["content"].startswith("Summarize")
    ]
    answers = _answer_requests(sim)
    assert len(answers) == turns
    assert 1 <= len(summaries) < turns // 2  # compaction: not one summary call per turn
    for messages in answers:
        assert prompt_tokens(messages) <= 900 - 100
    last = answers[-1]
    assert "Summary of the earlier conversation:" in last[0]["content"]
    assert "topic-0" in last[0]["content"]  # the oldest turn survives, in the summary
    assert not any(m["content"].startswith("topic-0 ") for m in last[1:])
    assert last[-1]["content"].startswith(f"topic-{turns - 1} ")
    meta = redis_proc.client().hgetall(f"kr:{{default:{conversation.session_id}}}:meta")
    stored = json.loads(meta[b"summary"])
    assert stored["through"] >= 1
    assert stored["text"].startswith("Summary: the customer asked about")


async def test_a_history_window_that_opens_on_an_answer_needs_no_summary(
    redis_url: str, sim: UpstreamSim
) -> None:
    # The prompt holds the last 4 stored messages (ending with the new question),
    # so from the third turn on the window opens on an assistant answer. Everything
    # still fits the budget by far: no turn may pay for a summarization call (this
    # once cost ~80 ms a turn).
    settings = make_settings(redis_url, sim.base_url, engine__prompt_history_messages=4)
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            for i in range(6):
                assert kinds(await run_turn(conversation, f"question {i}", f"q{i}"))[-1] == "done"
    finally:
        await app.shutdown(grace=0)
    assert len(sim.requests) == 6  # one LLM call per turn, none for summaries

"""The simulated upstream, exercised over real HTTP with the real `openai` client."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from korero.sim import (
    MAX_RECORDED_REQUESTS,
    Fault,
    SimConfig,
    UpstreamSim,
    _upstream,
    compose_answer,
)

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a helpful support agent."},
    {"role": "user", "content": "My parcel has not arrived, where is it?"},
]


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSim]:
    async with UpstreamSim() as upstream:
        yield upstream


@pytest.fixture
async def client(sim: UpstreamSim) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=sim.base_url, api_key="test", max_retries=0) as oai:
        yield oai


async def open_stream(
    client: AsyncOpenAI, messages: list[ChatCompletionMessageParam] = MESSAGES, **kwargs: Any
) -> AsyncStream[ChatCompletionChunk]:
    stream = await client.chat.completions.create(
        model="korero-test", messages=messages, stream=True, **kwargs
    )
    assert isinstance(stream, AsyncStream)
    return stream


async def collect(
    client: AsyncOpenAI, messages: list[ChatCompletionMessageParam] = MESSAGES, **kwargs: Any
) -> list[ChatCompletionChunk]:
    return [chunk async for chunk in await open_stream(client, messages, **kwargs)]


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def read_all(
    stream: AsyncStream[ChatCompletionChunk], into: list[ChatCompletionChunk]
) -> None:
    async for chunk in stream:
        into.append(chunk)


async def read_for(
    stream: AsyncStream[ChatCompletionChunk], seconds: float
) -> tuple[list[ChatCompletionChunk], bool]:
    """Chunks read within `seconds`, and whether the time ran out first."""
    received: list[ChatCompletionChunk] = []
    try:
        async with asyncio.timeout(seconds):
            await read_all(stream, received)
    except TimeoutError:
        return received, True
    return received, False


def finish_reason_of(chunks: list[ChatCompletionChunk]) -> str | None:
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    return reasons[-1] if reasons else None


# -- answers ------------------------------------------------------------------


async def test_stream_reproduces_answer_and_reports_usage(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    chunks = await collect(client, stream_options={"include_usage": True})

    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].model == "korero-test"
    assert text_of(chunks) == sim.answer_for(MESSAGES)
    assert text_of(chunks).startswith('You asked: "My parcel has not arrived, where is it?".')
    assert finish_reason_of(chunks) == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    # 6 words of system prompt + 8 of user message; 40 tokens by default.
    assert chunks[-1].usage.prompt_tokens == 14
    assert chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.total_tokens == 54
    recorded = sim.requests[-1]
    assert recorded.tokens_sent == 40
    assert recorded.finished_at is not None
    assert recorded.disconnected_at is None
    assert recorded.body["messages"] == MESSAGES


async def test_usage_is_omitted_when_not_asked_or_disabled(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    not_asked = await collect(client)
    assert all(c.usage is None for c in not_asked)
    assert finish_reason_of(not_asked) == "stop"

    sim.config = SimConfig(send_usage=False)
    disabled = await collect(client, stream_options={"include_usage": True})
    assert all(c.usage is None for c in disabled)
    assert all(c.choices for c in disabled)
    assert text_of(disabled) == sim.answer_for(MESSAGES)


async def test_non_streaming_completion_has_whole_text_and_usage(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    completion = await client.chat.completions.create(model="korero-test", messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == sim.answer_for(MESSAGES)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 40
    assert sim.requests[-1].tokens_sent == 40


async def test_answers_are_deterministic_and_depend_on_messages(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    first = text_of(await collect(client))
    second = text_of(await collect(client))
    other_messages: list[ChatCompletionMessageParam] = [
        *MESSAGES[:1],
        {"role": "user", "content": "Can I change my plan?"},
    ]
    other = text_of(await collect(client, messages=other_messages))
    same_question_new_history: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are terse."},
        MESSAGES[1],
    ]
    filler_differs = text_of(await collect(client, messages=same_question_new_history))

    assert first == second
    assert other != first
    assert other == sim.answer_for(other_messages)
    assert filler_differs != first
    # The answer is a pure function of the messages, not of the sim instance.
    assert "".join(compose_answer(MESSAGES, 40)) == first


async def test_customer_name_line_reaches_the_answer(sim: UpstreamSim, client: AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be kind.\nCustomer name: Aroha\nPlan: gold"},
        {"role": "user", "content": "Hi"},
    ]

    answer = text_of(await collect(client, messages=messages))

    assert "Aroha" in answer
    assert "Aroha" not in text_of(await collect(client))


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
async def test_token_limit_cuts_answer_with_finish_reason_length(
    sim: UpstreamSim, client: AsyncOpenAI, limit_field: str
) -> None:
    limit: dict[str, Any] = {limit_field: 5}
    chunks = await collect(client, stream_options={"include_usage": True}, **limit)

    full = sim.answer_for(MESSAGES)
    assert text_of(chunks) == "".join(compose_answer(MESSAGES, 40)[:5])
    assert full.startswith(text_of(chunks))
    assert finish_reason_of(chunks) == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


async def test_ttft_and_token_rate_are_honoured(sim: UpstreamSim, client: AsyncOpenAI) -> None:
    sim.config = SimConfig(ttft=0.2, tokens_per_second=50, answer_tokens=10)
    started = time.monotonic()
    stream = await open_stream(client)
    token_times: list[float] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            token_times.append(time.monotonic())

    assert len(token_times) == 10
    assert token_times[0] - started >= 0.2
    # Nine intervals at 50 tokens/s after the first token.
    assert token_times[-1] - token_times[0] >= 9 / 50 - 0.01
    recorded = sim.requests[-1]
    assert recorded.first_token_at is not None
    assert recorded.first_token_at - recorded.received_at >= 0.2

    # The config is read per request: back to instant answers.
    sim.config = SimConfig()
    started = time.monotonic()
    await collect(client)
    assert time.monotonic() - started < 0.2


# -- faults -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        (Fault("rate_limit", retry_after=7), openai.RateLimitError, 429),
        (Fault("server_error"), openai.InternalServerError, 500),
        (Fault("status", status=401), openai.AuthenticationError, 401),
        (Fault("status", status=404), openai.NotFoundError, 404),
    ],
)
@pytest.mark.parametrize("stream", [True, False])
async def test_error_faults_raise_the_matching_openai_error(
    sim: UpstreamSim,
    client: AsyncOpenAI,
    *,
    fault: Fault,
    error: type[openai.APIStatusError],
    status: int,
    stream: bool,
) -> None:
    sim.inject(fault)

    with pytest.raises(error) as caught:
        await client.chat.completions.create(model="korero-test", messages=MESSAGES, stream=stream)

    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"]
    if fault.kind == "rate_limit":
        assert caught.value.response.headers["retry-after"] == "7"
        assert caught.value.body["type"] == "rate_limit_exceeded"
    assert sim.requests[-1].fault == fault.kind
    # The fault is consumed: the next request succeeds.
    assert text_of(await collect(client)) == sim.answer_for(MESSAGES)


async def test_faults_are_consumed_in_order_with_counts(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    sim.inject(Fault("server_error", count=2), Fault("status", status=400))
    outcomes: list[str] = []
    for _ in range(4):
        try:
            await client.chat.completions.create(model="korero-test", messages=MESSAGES)
            outcomes.append("ok")
        except openai.APIStatusError as exc:
            outcomes.append(str(exc.status_code))

    assert outcomes == ["500", "500", "400", "ok"]
    assert [r.fault for r in sim.requests] == ["server_error", "server_error", "status", None]

    sim.inject(Fault("server_error", count=5))
    sim.clear_faults()
    await client.chat.completions.create(model="korero-test", messages=MESSAGES)


async def test_cut_fault_breaks_the_stream_after_some_tokens(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    sim.inject(Fault("cut", after_tokens=4))
    stream = await open_stream(client)
    received: list[ChatCompletionChunk] = []

    # openai 3.x maps the incomplete chunked body to APIConnectionError mid-iteration.
    with pytest.raises(openai.APIConnectionError):
        await read_all(stream, received)

    assert text_of(received) == "".join(compose_answer(MESSAGES, 40)[:4])
    assert finish_reason_of(received) is None
    recorded = sim.requests[-1]
    assert recorded.fault == "cut"
    assert recorded.tokens_sent == 4
    assert recorded.finished_at is None
    assert recorded.disconnected_at is None


async def test_cut_after_the_last_token_withholds_finish_and_done(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    sim.inject(Fault("cut", after_tokens=100))
    stream = await open_stream(client)
    received: list[ChatCompletionChunk] = []

    with pytest.raises(openai.APIConnectionError):
        await read_all(stream, received)

    assert text_of(received) == sim.answer_for(MESSAGES)
    assert finish_reason_of(received) is None
    assert sim.requests[-1].tokens_sent == 40


async def test_cut_fault_without_stream_gets_no_response(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    sim.inject(Fault("cut"))

    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="korero-test", messages=MESSAGES)

    assert sim.requests[-1].tokens_sent == 0


async def test_client_closing_a_stalled_stream_is_recorded_as_disconnect(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    sim.inject(Fault("stall", after_tokens=2))
    stream = await open_stream(client)
    received, timed_out = await read_for(stream, 0.3)
    await stream.close()

    recorded = await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=2.0)

    assert timed_out
    assert text_of(received) == "".join(compose_answer(MESSAGES, 40)[:2])
    assert recorded.fault == "stall"
    assert recorded.tokens_sent == 2
    assert recorded.finished_at is None


async def test_stall_before_first_token_then_disconnect(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    sim.inject(Fault("stall", after_tokens=0))
    stream = await open_stream(client)
    received, timed_out = await read_for(stream, 0.2)
    await stream.close()

    recorded = await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=2.0)
    assert timed_out
    assert text_of(received) == ""
    assert recorded.tokens_sent == 0
    assert recorded.first_token_at is None


@pytest.mark.parametrize("after_tokens", [3, 100])
async def test_short_stall_resumes_the_stream(
    sim: UpstreamSim, client: AsyncOpenAI, after_tokens: int
) -> None:
    sim.inject(Fault("stall", after_tokens=after_tokens, stall_seconds=0.2))
    started = time.monotonic()

    chunks = await collect(client)

    assert time.monotonic() - started >= 0.2
    assert text_of(chunks) == sim.answer_for(MESSAGES)
    assert finish_reason_of(chunks) == "stop"


async def test_disconnect_during_ttft_wait_is_recorded(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    sim.config = SimConfig(ttft=5.0)
    stream = await open_stream(client)
    received, timed_out = await read_for(stream, 0.2)
    await stream.close()
    closed_at = time.monotonic()
    assert timed_out
    assert [c.choices[0].delta.role for c in received] == ["assistant"]

    recorded = await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=2.0)

    assert recorded.disconnected_at is not None
    assert recorded.disconnected_at - closed_at < 1.0
    assert recorded.tokens_sent == 0


async def test_disconnect_before_response_headers_is_recorded(
    sim: UpstreamSim, client: AsyncOpenAI
) -> None:
    sim.config = SimConfig(ttft=5.0)

    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="korero-test", messages=MESSAGES, timeout=0.2)

    recorded = await sim.wait_for(lambda r: r.disconnected_at is not None, timeout=2.0)
    assert recorded.finished_at is None


async def test_delay_fault_holds_back_the_headers(sim: UpstreamSim, client: AsyncOpenAI) -> None:
    sim.inject(Fault("delay", seconds=0.2))
    started = time.monotonic()

    stream = await open_stream(client)
    headers_at = time.monotonic()
    chunks = [chunk async for chunk in stream]

    assert headers_at - started >= 0.2
    assert text_of(chunks) == sim.answer_for(MESSAGES)
    assert sim.requests[-1].fault == "delay"


async def test_wait_for_times_out_when_nothing_matches(sim: UpstreamSim) -> None:
    started = time.monotonic()

    with pytest.raises(TimeoutError):
        await sim.wait_for(lambda r: r.id == 99, timeout=0.1)

    assert time.monotonic() - started >= 0.1


async def test_stop_cancels_a_stalled_request_promptly(sim: UpstreamSim) -> None:
    sim.inject(Fault("stall"))
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sim.base_url}/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        await sim.wait_for(lambda r: r.fault == "stall")
        started = time.monotonic()

        await sim.stop()

        assert time.monotonic() - started < 1.5
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    # Stopping the server is not the client going away.
    assert sim.requests[-1].disconnected_at is None


# -- bad input and validation --------------------------------------------------


async def test_bad_request_bodies_get_400(sim: UpstreamSim) -> None:
    async with aiohttp.ClientSession() as session:
        url = f"{sim.base_url}/chat/completions"
        async with session.post(url, data=b"not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with session.post(url, json={"model": "m"}) as resp:
            assert resp.status == 400
    assert sim.requests == []


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        Fault("cut", count=0)
    with pytest.raises(ValueError, match="status"):
        Fault("status", status=200)
    with pytest.raises(ValueError, match="unknown fault fields"):
        Fault.from_dict({"kind": "cut", "after": 3})
    assert Fault.from_dict({"kind": "stall", "after_tokens": 1, "stall_seconds": 2}) == Fault(
        "stall", after_tokens=1, stall_seconds=2.0
    )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="ttft"):
        SimConfig(ttft=-1)
    with pytest.raises(ValueError, match="tokens_per_second"):
        SimConfig(tokens_per_second=float("nan"))


# -- control endpoints ----------------------------------------------------------


async def test_control_endpoints(sim: UpstreamSim, client: AsyncOpenAI) -> None:
    root = f"http://127.0.0.1:{sim.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{root}/health") as resp:
            assert resp.status == 200
            assert await resp.text() == "ok"

        faults = [{"kind": "rate_limit", "retry_after": 2}, {"kind": "status", "status": 403}]
        async with session.post(f"{root}/_sim/faults", json=faults) as resp:
            assert resp.status == 200
            assert (await resp.json())["queued"] == 2
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        async with session.delete(f"{root}/_sim/faults") as resp:
            assert resp.status == 200
        await client.chat.completions.create(model="m", messages=MESSAGES)

        async with session.post(f"{root}/_sim/faults", json=[{"kind": "boom"}]) as resp:
            assert resp.status == 400
        async with session.post(f"{root}/_sim/faults", json={"kind": "cut"}) as resp:
            assert resp.status == 400

        async with session.get(f"{root}/_sim/requests") as resp:
            recorded = await resp.json()

    assert [r["id"] for r in recorded] == [1, 2]
    assert recorded[0]["fault"] == "rate_limit"
    assert recorded[1]["fault"] is None
    assert recorded[1]["tokens_sent"] == 40
    assert recorded[1]["finished_at"] >= recorded[1]["received_at"]
    assert recorded[1]["disconnected_at"] is None
    assert set(recorded[1]) >= {"received_at", "first_token_at", "finished_at", "model", "stream"}

    models = await client.models.list()
    assert [m.id for m in models.data] == ["korero-sim-1"]


async def test_recordings_keep_only_the_most_recent(
    sim: UpstreamSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert MAX_RECORDED_REQUESTS == 10_000
    monkeypatch.setattr(_upstream, "MAX_RECORDED_REQUESTS", 3)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.post(
                f"{sim.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES}
            ) as resp:
                assert resp.status == 200

    assert len(sim.requests) == 3
    assert [r.id for r in sim.requests] == [3, 4, 5]
    assert sim.requests[0].id == 3


# -- command line -------------------------------------------------------------


@pytest.mark.slow
async def test_cli_serves_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "korero.sim",
        "--port",
        "0",
        "--answer-tokens",
        "7",
        "--persona",
        "echo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=10)).decode()
        match = re.fullmatch(r"upstream-sim listening on (http://127\.0\.0\.1:(\d+)/v1)\n", line)
        assert match is not None, line
        assert int(match.group(2)) > 0

        async with AsyncOpenAI(base_url=match.group(1), api_key="test", max_retries=0) as oai:
            chunks = await collect(oai)
        assert text_of(chunks) == "".join(compose_answer(MESSAGES, 7))

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=5) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_the_sim_quotes_knowledge_base_excerpts_with_their_citations() -> None:
    system = (
        "Rules, for example [Source: Not An Excerpt, Section 9].\n\n"
        "Knowledge base excerpts:\n\n"
        "[Source: Baggage Policy, Section 2.1] Checked baggage allowance\n"
        "Economy Light fares include no checked baggage. Economy Standard fares include one "
        "checked bag of up to 23 kg. Business fares include two bags.\n\n"
        "[Source: Baggage Policy, Section 2.2] Size and weight limits\n"
        "A checked bag must not weigh more than 32 kg."
    )
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "How many checked bags on Economy Standard?"},
    ]
    text = "".join(compose_answer(messages, 40))
    assert text.startswith("Here is what our policy says:")
    assert (
        "\n- Economy Light fares include no checked baggage. Economy Standard fares include one "
        "checked bag of up to 23 kg. [Source: Baggage Policy, Section 2.1]" in text
    )
    assert text.endswith("32 kg. [Source: Baggage Policy, Section 2.2]")
    assert "Not An Excerpt" not in text


def test_the_sim_summarizes_a_transcript_and_keeps_the_earlier_summary() -> None:
    messages = [
        {"role": "system", "content": "Summarize this conversation."},
        {
            "role": "user",
            "content": "Earlier summary: Summary: the customer asked about refunds.\n\n"
            "Conversation:\ncustomer: where is my bag please\nassistant: it is coming",
        },
    ]
    text = "".join(compose_answer(messages, 40))
    assert text == "Summary: the customer asked about refunds; where is my bag."

"""Tracing and metrics of a real turn: the span tree, GenAI attributes, the
caller's trace continued, the Prometheus endpoint, and no message text in either."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from korero.client import ChatClient
from korero.server.app import KoreroServer
from korero.sim import UpstreamSim
from tests.conftest import REDIS_CLUSTER, make_settings
from tests.helpers import kinds, run_turn

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
SECRET_TEXT = "my passport number is X1234567"


@pytest.fixture
async def traced(
    redis_url: str, sim: UpstreamSim
) -> AsyncIterator[tuple[KoreroServer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = await KoreroServer.start(make_settings(redis_url, sim.base_url), tracer_provider=provider)
    yield app, exporter
    await app.shutdown(grace=0)


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    matches = [s for s in spans if s.name == name]
    assert matches, f"no span {name!r} in {[s.name for s in spans]}"
    return matches[0]


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_turn_produces_the_span_tree(
    traced: tuple[KoreroServer, InMemorySpanExporter],
) -> None:
    app, exporter = traced
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN}-01"
    async with ChatClient(f"127.0.0.1:{app.port}", metadata=[("traceparent", traceparent)]) as c:
        conversation = await c.conversation()
        events = await run_turn(conversation, SECRET_TEXT, "t1")
        assert kinds(events)[-1] == "done"
        await conversation.close()
    # The trace id of the caller continues and is handed back on turn_started.
    assert events[0].turn_started.trace_id == TRACE_ID

    spans = exporter.get_finished_spans()
    rpc = _by_name(spans, "/korero.chat.v1.ChatService/Chat")
    assert format(rpc.context.trace_id, "032x") == TRACE_ID
    assert _parent(rpc) == int(PARENT_SPAN, 16)
    turn = _by_name(spans, "korero.turn")
    assert _parent(turn) == rpc.context.span_id
    assert turn.attributes is not None
    assert turn.attributes["korero.outcome"] == "stop"
    for child in ("korero.session_load", "korero.context_assembly", "korero.persist"):
        assert _parent(_by_name(spans, child)) == turn.context.span_id
    llm = _by_name(spans, "chat korero-sim-1")
    assert _parent(llm) == turn.context.span_id
    attrs = dict(llm.attributes or {})
    usage = events[-1].done.usage
    assert attrs["gen_ai.request.model"] == "korero-sim-1"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.usage.input_tokens"] == usage.input_tokens
    assert attrs["gen_ai.usage.output_tokens"] == usage.output_tokens
    assert float(attrs["gen_ai.response.time_to_first_token"]) > 0  # type: ignore[arg-type]
    # Redis calls are spans under the stage that made them.
    session_load = _by_name(spans, "korero.session_load")
    redis_spans = [s for s in spans if _parent(s) == session_load.context.span_id]
    assert redis_spans
    if REDIS_CLUSTER:  # the instrumentation finds no connection pool to read db.system from
        assert all(s.attributes and "db.statement" in s.attributes for s in redis_spans)
    else:
        assert all(s.attributes and s.attributes.get("db.system") == "redis" for s in redis_spans)
    # No span carries the message text.
    for span in spans:
        for value in (span.attributes or {}).values():
            assert SECRET_TEXT not in str(value), span.name


async def test_metrics_endpoint_after_a_real_turn(redis_url: str, sim: UpstreamSim) -> None:
    settings = make_settings(redis_url, sim.base_url, limits__session_messages_per_minute=1)
    app = await KoreroServer.start(settings)
    try:
        async with ChatClient(f"127.0.0.1:{app.port}") as client:
            conversation = await client.conversation()
            done = await run_turn(conversation, SECRET_TEXT, "m1")
            refused = await run_turn(conversation, "second", "m2")
            assert refused[-1].error.reason == "RATE_LIMITED"
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as response,
            ):
                assert response.status == 200
                body = await response.text()
        usage = done[-1].done.usage
        lines = body.splitlines()

        def value(prefix: str) -> float:
            matched = [line for line in lines if line.startswith(prefix)]
            assert matched, prefix
            return float(matched[0].rsplit(" ", 1)[1])

        assert value('korero_turns_total{outcome="stop",reason=""}') == 1
        assert value("korero_time_to_first_token_seconds_count") == 1
        assert value("korero_turn_duration_seconds_count") == 1
        assert value("korero_active_streams") == 1
        assert (
            value(
                'korero_llm_tokens_total{direction="input",model="korero-sim-1",tenant="default"}'
            )
            == usage.input_tokens
        )
        assert (
            value(
                'korero_llm_tokens_total{direction="output",model="korero-sim-1",tenant="default"}'
            )
            == usage.output_tokens
        )
        assert value('korero_rate_limit_rejections_total{limit="session_messages"}') == 1
        assert "korero_llm_cost_usd_total" in body
        assert "korero_cache_requests_total" in body or "korero_cache_requests" in body
        assert "korero_redis_errors" in body
        assert "korero_upstream_errors" in body
        assert SECRET_TEXT not in body
    finally:
        await app.shutdown(grace=0)

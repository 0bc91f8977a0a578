"""One answer from the upstream: retries before the first token, timeouts, a span.

`AnswerGenerator.generate` streams the answer's text into a coalescer and
returns the usage and finish reason. Failures are retried (with backoff, an
upstream Retry-After winning) only while nothing has been sent, and only
within the turn's deadline; a stall before the first token ends the attempt
after `first_token_timeout` (retried), a stall after it the answer after
`inter_token_timeout` (`INTER_TOKEN_TIMEOUT`, not retried: text was sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc
from opentelemetry import trace

from korero.server.conversation.coalesce import DeltaCoalescer
from korero.server.conversation.tools_loop import ToolLoop, ToolTurn
from korero.server.conversation.turn import StageTimings
from korero.server.errors import KoreroError
from korero.server.llm.provider import LLMProvider, LLMRequest, TokenUsage
from korero.server.settings import LLMSettings

__all__ = ["AnswerGenerator"]

log = logging.getLogger(__name__)


def _first_token_timeout(seconds: float) -> KoreroError:
    return KoreroError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "FIRST_TOKEN_TIMEOUT",
        f"the assistant sent nothing for {seconds:g}s",
        retryable=True,
    )


def _inter_token_timeout(seconds: float) -> KoreroError:
    return KoreroError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "INTER_TOKEN_TIMEOUT",
        f"the assistant stopped for {seconds:g}s in the middle of the answer",
        retryable=True,
    )


class _StallError(Exception):
    """The upstream sent nothing for too long: before the first token, or mid-answer."""

    def __init__(self, *, mid_answer: bool) -> None:
        super().__init__("upstream stalled")
        self.mid_answer = mid_answer


def _deadline_exceeded() -> KoreroError:
    return KoreroError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "TURN_DEADLINE_EXCEEDED",
        "the answer did not finish before the deadline",
        retryable=True,
    )


class AnswerGenerator:
    """Streams answers from an `LLMProvider` under the turn's deadline."""

    def __init__(
        self,
        *,
        llm: LLMProvider,
        settings: LLMSettings,
        tracer: trace.Tracer,
        clock: Callable[[], float] = time.monotonic,
        tool_loop: ToolLoop | None = None,
    ) -> None:
        self._llm = llm
        self._settings = settings
        self._tracer = tracer
        self._clock = clock
        self._tool_loop = tool_loop

    async def generate(
        self,
        messages: list[dict[str, str]],
        model: str,
        deadline: float,
        coalescer: DeltaCoalescer,
        answer: list[str],
        timings: StageTimings,
        tools: ToolTurn | None = None,
    ) -> tuple[TokenUsage | None, str]:
        """Stream the answer into `coalescer` (and `answer`), inside a GenAI client span.

        With `tools`, the answer comes through the tool loop (see `tools_loop`).
        """
        usage: TokenUsage | None = None
        finish: str | None = None
        with self._tracer.start_as_current_span(
            f"chat {model}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": self._settings.max_tokens,
            },
        ) as span:
            try:
                usage, finish = await self._attempts(
                    LLMRequest(
                        messages, model, self._settings.max_tokens, self._settings.temperature
                    ),
                    deadline,
                    coalescer,
                    answer,
                    timings,
                    tools,
                )
            finally:
                _span_end(span, timings, usage, finish)
        return usage, finish

    async def _attempts(
        self,
        request: LLMRequest,
        deadline: float,
        coalescer: DeltaCoalescer,
        answer: list[str],
        timings: StageTimings,
        tools: ToolTurn | None,
    ) -> tuple[TokenUsage | None, str]:
        attempt = 0
        while True:
            timings.llm_started = timings.llm_started or self._clock()
            try:
                usage, finish = await self._attempt(request, deadline, coalescer, answer, tools)
            except _StallError as stall:
                timings.llm_ended = self._clock()
                if stall.mid_answer:  # text was sent: not retried
                    raise _inter_token_timeout(self._settings.inter_token_timeout) from None
                error = _first_token_timeout(self._settings.first_token_timeout)
                if answer or not self._may_retry(attempt, deadline, 0.0):
                    raise error from None
            except TimeoutError:  # the turn's deadline
                timings.llm_ended = self._clock()
                raise _deadline_exceeded() from None
            except KoreroError as error:
                timings.llm_ended = self._clock()
                backoff = error.retry_after or self._settings.retry_backoff * 2**attempt
                if answer or not error.retryable or not self._may_retry(attempt, deadline, backoff):
                    raise
                log.info(
                    "event=llm_retry attempt=%d reason=%s backoff=%.3f",
                    attempt + 1,
                    error.reason,
                    backoff,
                )
                await asyncio.sleep(backoff)
            else:
                timings.llm_ended = self._clock()
                if finish is None:  # cut after it began: not retried (text may have been sent)
                    raise KoreroError(
                        grpc.StatusCode.UNAVAILABLE,
                        "UPSTREAM_STREAM_INTERRUPTED",
                        "the assistant's answer was interrupted; please try again",
                        retryable=True,
                    )
                return usage, finish
            attempt += 1

    async def _attempt(
        self,
        request: LLMRequest,
        deadline: float,
        coalescer: DeltaCoalescer,
        answer: list[str],
        tools: ToolTurn | None,
    ) -> tuple[TokenUsage | None, str | None]:
        """One upstream call; `_StallError` on a stall, TimeoutError at the deadline.

        The gap timer waits `first_token_timeout` for the first token, then
        `inter_token_timeout` after each piece of text; a tool call or the
        finish reason stops it (tools have their own timeouts).
        """
        usage: TokenUsage | None = None
        finish: str | None = None
        loop = asyncio.get_running_loop()
        inter_token = self._settings.inter_token_timeout
        texts = 0
        async with asyncio.timeout(deadline - self._clock()):
            if tools is not None and self._tool_loop is not None:
                stream = self._tool_loop.stream(self._llm, request, tools)
            else:
                stream = self._llm.stream(request)
            async with contextlib.aclosing(stream):
                first_by = min(deadline, self._clock() + self._settings.first_token_timeout)
                gap = asyncio.timeout(first_by - self._clock())
                try:
                    async with gap:
                        async for chunk in stream:
                            if chunk.text:
                                gap.reschedule(loop.time() + inter_token)
                                texts += 1
                                answer.append(chunk.text)
                                coalescer.add(chunk.text)
                            elif chunk.finish_reason or chunk.tool_calls:
                                gap.reschedule(None)
                            finish = chunk.finish_reason or finish
                            usage = chunk.usage or usage
                except TimeoutError:
                    if gap.expired():
                        raise _StallError(mid_answer=texts > 0) from None
                    raise
        return usage, finish

    def _may_retry(self, attempt: int, deadline: float, backoff: float) -> bool:
        return attempt < self._settings.max_retries and self._clock() + backoff < deadline


def _span_end(
    span: trace.Span, timings: StageTimings, usage: TokenUsage | None, finish: str | None
) -> None:
    if timings.first_token is not None:
        span.set_attribute(
            "gen_ai.response.time_to_first_token", timings.first_token - timings.started
        )
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
    if finish:
        span.set_attribute("gen_ai.response.finish_reasons", [finish])

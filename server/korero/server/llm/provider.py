"""The LLM provider: any OpenAI-compatible endpoint through the `openai` package.

`openai` exceptions are translated to `UpstreamError` by `errors.py`, in one
table, and nowhere else. Retrying and deadlines are the engine's business: the
provider makes one attempt per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import httpx2 as httpx  # the HTTP library of openai>=3; its errors can escape a stream
import openai

from korero.server.errors import UpstreamError
from korero.server.llm.errors import translate_openai_error
from korero.server.llm.transport import AiohttpTransport
from korero.server.settings import LLMSettings

__all__ = [
    "SIMULATED_MODEL",
    "SSE_DONE",
    "LLMChunk",
    "LLMProvider",
    "LLMRequest",
    "OpenAIProvider",
    "TokenUsage",
    "ToolCallDelta",
    "display_model",
    "estimate_tokens",
    "parse_sse_line",
]


@dataclass(frozen=True)
class TokenUsage:
    """Tokens used by one call; `estimated` when the upstream did not say."""

    input_tokens: int
    output_tokens: int
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class LLMRequest:
    """One chat completion request."""

    messages: Sequence[dict[str, Any]]
    model: str
    max_tokens: int
    temperature: float
    tools: Sequence[dict[str, Any]] = ()
    """OpenAI ``tools`` entries the model may call (empty: none offered)."""


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call; pieces with the same `index` make one call."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""
    """A fragment of the arguments' JSON text, to be concatenated in order."""


@dataclass(frozen=True)
class LLMChunk:
    """A piece of a streamed answer: text, tool-call pieces, a finish reason, or usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: TokenUsage | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()


class LLMProvider(Protocol):
    """Streams a chat completion. Raises only `UpstreamError`.

    Closing the returned iterator (or cancelling its consumer) must abort the
    upstream request, so a cancelled turn stops costing tokens.
    """

    def stream(self, request: LLMRequest) -> AsyncGenerator[LLMChunk, None]: ...

    async def aclose(self) -> None: ...


SIMULATED_MODEL = "korero-sim-1"
"""The model name of the simulated upstream (`korero upstream-sim`), the default."""


def display_model(model: str) -> str:
    """The model name shown to clients: the simulator's is labelled as simulated."""
    return f"{model} (simulated)" if model == SIMULATED_MODEL else model


def estimate_tokens(text: str) -> int:
    """A rough token count (about 4 characters per token) for upstreams that send no usage."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


_UPSTREAM_CONNECTIONS = 2000


class OpenAIProvider:
    """`openai.AsyncOpenAI` pointed at any OpenAI-compatible base URL."""

    def __init__(self, settings: LLMSettings, client: openai.AsyncOpenAI | None = None) -> None:
        self._settings = settings
        self._client = client or openai.AsyncOpenAI(
            base_url=settings.base_url,
            api_key=settings.api_key,
            max_retries=0,  # the engine retries, and only before the first token
            timeout=openai.Timeout(connect=5.0, read=None, write=10.0, pool=10.0),
            # aiohttp's C parser under the openai client (see llm/transport.py).
            # As many idle connections kept as turns may be in flight: with
            # fewer, every extra turn paid for a new connection.
            http_client=openai.DefaultAsyncHttpxClient(
                transport=AiohttpTransport(
                    max_connections=_UPSTREAM_CONNECTIONS, keepalive_expiry=30.0
                )
            ),
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(self, request: LLMRequest) -> AsyncGenerator[LLMChunk, None]:
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": list(request.messages),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            kwargs["tools"] = list(request.tools)
        # The request goes through the openai client (auth, base URL, timeouts,
        # status errors as openai exceptions) via its documented generic `post`,
        # and the SSE lines are parsed here with `json`. The typed
        # `chat.completions.create` path validated the request body recursively
        # (about 6 ms for a prompt with history) and built a pydantic model per
        # chunk, together most of the server's CPU (see bench/README.md).
        try:
            response = await self._client.post(
                "/chat/completions", cast_to=httpx.Response, body=kwargs, stream=True
            )
        except (openai.OpenAIError, httpx.TransportError) as exc:
            raise translate_openai_error(exc) from exc
        try:
            async for chunk in _sse_chunks(response):
                yield chunk
        except (openai.APIConnectionError, httpx.TransportError, httpx.StreamError) as exc:
            # Once the response has started, a lost connection is a cut answer.
            raise translate_openai_error(exc, mid_stream=True) from exc
        except openai.OpenAIError as exc:
            raise translate_openai_error(exc) from exc
        finally:
            # Closing the response closes the HTTP stream: the upstream sees the
            # client go away and stops generating. A response read to its end
            # (see `_sse_chunks`) leaves its connection in the pool instead.
            await response.aclose()


_DRAIN_AFTER_DONE = 1.0
"""Seconds to wait for the end of the body after `[DONE]` (the chunked terminator)."""


async def _sse_chunks(response: httpx.Response) -> AsyncGenerator[LLMChunk, None]:
    """The chunks of an SSE body, split into lines here (bytes in, one `json.loads` each).

    After `[DONE]` the rest of the body (normally only the chunked-encoding
    terminator) is read, so the connection is reused instead of closed: a
    response closed before its end costs the next turn a new TCP connection.
    """
    body = response.aiter_bytes()
    pending = b""
    async for data in body:
        pending = pending + data if pending else data
        if b"\n" not in data:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            chunk = parse_sse_line(line)
            if chunk is SSE_DONE:
                with contextlib.suppress(TimeoutError, httpx.TransportError, httpx.StreamError):
                    async with asyncio.timeout(_DRAIN_AFTER_DONE):
                        async for _ in body:
                            pass
                return
            if chunk is not None:
                yield chunk
    if pending:
        chunk = parse_sse_line(pending)
        if chunk is not None and chunk is not SSE_DONE:
            yield chunk


SSE_DONE = LLMChunk(finish_reason="[DONE]")


def parse_sse_line(line: str | bytes) -> LLMChunk | None:
    """One `data:` line of a chat.completion.chunk stream (None: nothing in it)."""
    if isinstance(line, str):
        line = line.encode()
    if not line.startswith(b"data:"):
        return None  # blank separators, comments, `event:` lines
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return SSE_DONE
    try:
        data = json.loads(payload)
    except ValueError:
        raise UpstreamError(
            grpc.StatusCode.INTERNAL,
            "UPSTREAM_BAD_RESPONSE",
            "the assistant sent a malformed stream",
        ) from None
    if not isinstance(data, dict):
        return None
    if "error" in data:
        error = data["error"] if isinstance(data["error"], dict) else {}
        message = str(error.get("message", "upstream error"))
        raise translate_openai_error(openai.APIError(message, request=None, body=error))  # type: ignore[arg-type]
    usage = None
    raw_usage = data.get("usage")
    if isinstance(raw_usage, dict):
        usage = TokenUsage(
            int(raw_usage.get("prompt_tokens") or 0), int(raw_usage.get("completion_tokens") or 0)
        )
    text, finish = "", None
    calls: tuple[ToolCallDelta, ...] = ()
    choices = data.get("choices")
    if choices:
        choice = choices[0]
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        finish = choice.get("finish_reason")
        if delta.get("tool_calls"):
            calls = _tool_call_deltas(delta["tool_calls"])
    if text or finish or usage or calls:
        return LLMChunk(text, finish, usage, calls)
    return None


def _tool_call_deltas(raw: object) -> tuple[ToolCallDelta, ...]:
    if not isinstance(raw, list):
        return ()
    deltas = []
    for position, item in enumerate(raw):
        if not isinstance(item, dict):
            continue
        raw_function = item.get("function")
        function: dict[str, Any] = raw_function if isinstance(raw_function, dict) else {}
        index = item.get("index")
        deltas.append(
            ToolCallDelta(
                index=index if isinstance(index, int) else position,
                id=str(item.get("id") or ""),
                name=str(function.get("name") or ""),
                arguments=str(function.get("arguments") or ""),
            )
        )
    return tuple(deltas)

"""A simulated OpenAI-compatible upstream served over real HTTP.

`UpstreamSim` runs an `aiohttp.web` server that answers
``POST /v1/chat/completions`` the way OpenAI does (SSE chunks or one JSON
object), with deterministic text, configurable timing and injectable faults.
Tests and benchmarks point the real ``openai`` client at `UpstreamSim.base_url`.

Answers are a pure function of the request's ``messages`` (see
`compose_answer`):

* they start by echoing the last user message: ``You asked: "<first 80 chars>".``;
* if any message has a line starting with ``Customer name: X``, they go on
  with ``Thanks, X.`` so tests can assert that session metadata reached the
  prompt;
* the rest are words from a fixed list, chosen by a SHA-3 (SHAKE-256) digest
  of the whole messages list.

The answer has exactly `SimConfig.answer_tokens` tokens, so the echo and the
name are themselves cut when that budget is smaller than they are.

Two kinds of prompt get a more useful answer (this is what makes `make run`
helpful without an API key; it is still a simulation, not a model):

* a prompt with knowledge-base excerpts (lines starting
  ``[Source: <title>, Section <id>]`` followed by the excerpt's text) is
  answered by quoting them: ``Here is what our policy says:`` and, for the
  first two excerpts, a bullet with the one or two sentences that share the
  most words with the question, followed by the excerpt's citation label; at
  most ``max(answer_tokens, SimConfig.quote_tokens)`` tokens;
* a summarization request (the system message starts with ``Summarize``) is
  answered with ``Summary: the customer asked about``, what an ``Earlier
  summary:`` line said they asked about, and the first words of each
  ``customer:`` line. A token is
a word with its leading space, so the concatenated deltas are the text.

Faults (`Fault`) queue up and are consumed, in order, by the next chat
completion requests; other endpoints never consume them.

Control endpoints, for when the sim runs as its own process:

* ``POST /_sim/faults``: a JSON list of fault objects (the `Fault` fields) to queue;
* ``DELETE /_sim/faults``: clear the queue;
* ``GET /_sim/requests``: the recorded requests, without their bodies;
* ``GET /health``: ``ok``;
* ``GET /v1/models``: the configured model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self, get_args

from aiohttp import web

from korero.server.context import citations

__all__ = [
    "DEFAULT_MODEL",
    "MAX_RECORDED_REQUESTS",
    "Fault",
    "FaultKind",
    "RecordedRequest",
    "SimConfig",
    "UpstreamSim",
    "compose_answer",
    "prompt_token_count",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "korero-sim-1"
DEFAULT_ANSWER_TOKENS = 40
MAX_RECORDED_REQUESTS = 10_000
ECHO_CHARS = 80
# Upper bound on one sleep inside `wait_for`, so predicates on fields that
# change without a notification (tokens_sent) are still seen promptly.
_WAIT_POLL_SECONDS = 0.05
# How long `stop()` lets in-flight handlers wind down after cancelling them.
_SHUTDOWN_GRACE_SECONDS = 1.0

FaultKind = Literal["rate_limit", "server_error", "status", "cut", "stall", "delay"]
_FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))

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

_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    409: ("invalid_request_error", None),
    422: ("invalid_request_error", None),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
}


@dataclass(frozen=True)
class SimConfig:
    """How the simulated upstream answers; read afresh for every request."""

    ttft: float = 0.0
    """Seconds between the response headers and the first content token."""
    tokens_per_second: float = 0.0
    """Streaming rate after the first token; 0 or infinity means unlimited."""
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    """Tokens in a full answer, before any ``max_tokens`` cut."""
    quote_tokens: int = 120
    """Most tokens of an answer that quotes knowledge-base excerpts."""
    send_usage: bool = True
    """Whether usage is reported; False mimics servers that never send it."""
    model: str = DEFAULT_MODEL
    """Model name reported when the request names none."""

    def __post_init__(self) -> None:
        if not self.ttft >= 0:
            raise ValueError(f"ttft must be >= 0, got {self.ttft}")
        if not self.tokens_per_second >= 0:
            raise ValueError(f"tokens_per_second must be >= 0, got {self.tokens_per_second}")
        if self.answer_tokens < 0:
            raise ValueError(f"answer_tokens must be >= 0, got {self.answer_tokens}")


@dataclass(frozen=True)
class Fault:
    """A failure to inject into the next `count` chat completion requests.

    Kinds:

    * ``rate_limit``: 429 with ``Retry-After: retry_after`` and an OpenAI error body;
    * ``server_error``: 500 with an OpenAI error body;
    * ``status``: HTTP ``status`` (400-599) with an OpenAI error body;
    * ``cut``: stream ``after_tokens`` tokens, then close the connection
      without ``[DONE]`` (a non-streaming request gets no response at all);
    * ``stall``: stream ``after_tokens`` tokens, then hang for
      ``stall_seconds`` before carrying on (a non-streaming request hangs
      before its response);
    * ``delay``: wait ``seconds`` more before the response headers.
    """

    kind: FaultKind
    count: int = 1
    status: int = 500
    retry_after: float = 1.0
    after_tokens: int = 3
    stall_seconds: float = 3600.0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        if not 400 <= self.status <= 599:
            raise ValueError(f"status must be in 400..599, got {self.status}")
        if self.after_tokens < 0:
            raise ValueError(f"after_tokens must be >= 0, got {self.after_tokens}")
        for name in ("retry_after", "stall_seconds", "seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Fault:
        """Build a fault from its JSON form (the field names); raise ValueError if invalid."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        kind = data.get("kind")
        if not isinstance(kind, str):
            raise ValueError("fault needs a string 'kind'")
        kwargs: dict[str, Any] = {"kind": kind}
        for name in ("count", "status", "after_tokens"):
            if name in data:
                value = data[name]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"fault field {name!r} must be an integer")
                kwargs[name] = value
        for name in ("retry_after", "stall_seconds", "seconds"):
            if name in data:
                value = data[name]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"fault field {name!r} must be a number")
                kwargs[name] = float(value)
        return cls(**kwargs)


@dataclass
class RecordedRequest:
    """One chat completion request as the sim saw it; times are `time.monotonic()`."""

    id: int
    body: dict[str, Any]
    received_at: float
    first_token_at: float | None = None
    finished_at: float | None = None
    """Set once ``[DONE]`` or the full (or error) response was sent."""
    disconnected_at: float | None = None
    """Set when the client went away before the response was finished."""
    tokens_sent: int = 0
    fault: FaultKind | None = None
    client_port: int = 0
    """The client's TCP port: requests on one kept-alive connection share it."""

    def to_dict(self) -> dict[str, object]:
        """The JSON form served by ``GET /_sim/requests`` (no body text)."""
        return {
            "id": self.id,
            "model": self.body.get("model"),
            "stream": bool(self.body.get("stream")),
            "received_at": self.received_at,
            "first_token_at": self.first_token_at,
            "finished_at": self.finished_at,
            "disconnected_at": self.disconnected_at,
            "tokens_sent": self.tokens_sent,
            "fault": self.fault,
            "client_port": self.client_port,
        }


@dataclass
class _PendingFault:
    fault: Fault
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = self.fault.count


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
    messages: Sequence[Mapping[str, Any]], answer_tokens: int, quote_tokens: int = 120
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


def _error_body(status: int, message: str) -> dict[str, object]:
    error_type, code = _ERROR_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _token_interval(config: SimConfig) -> float:
    rate = config.tokens_per_second
    return 0.0 if rate <= 0 or math.isinf(rate) else 1.0 / rate


def _encode_stream(
    completion_id: str,
    model: str,
    tokens: list[str],
    finish_reason: str,
    usage: dict[str, int] | None,
) -> tuple[bytes, list[bytes], bytes]:
    """SSE bytes of a streamed answer: the role chunk, one chunk per token, and the tail.

    The tail holds the finish chunk, the usage chunk when `usage` is given, and ``[DONE]``.
    """
    envelope = (
        f'data: {{"id":{json.dumps(completion_id)},"object":"chat.completion.chunk",'
        f'"created":{int(time.time())},"model":{json.dumps(model)},"choices":'
    )
    role_chunk = (
        envelope + '[{"index":0,"delta":{"role":"assistant","content":""},'
        '"finish_reason":null}]}\n\n'
    )
    token_chunks = [
        (
            envelope + '[{"index":0,"delta":{"content":'
            f'{json.dumps(token, ensure_ascii=False)}}},"finish_reason":null}}]}}\n\n'
        ).encode()
        for token in tokens
    ]
    tail = envelope + f'[{{"index":0,"delta":{{}},"finish_reason":"{finish_reason}"}}]}}\n\n'
    if usage is not None:
        tail += envelope + f'[],"usage":{json.dumps(usage, separators=(",", ":"))}}}\n\n'
    tail += "data: [DONE]\n\n"
    return role_chunk.encode(), token_chunks, tail.encode()


class UpstreamSim:
    """A simulated OpenAI-compatible upstream on a real TCP port.

    Use it as ``async with UpstreamSim(SimConfig(ttft=0.1)) as sim:`` and give
    ``sim.base_url`` to ``openai.AsyncOpenAI``. `config` may be replaced
    between requests; each request reads it once, when it arrives.
    """

    # SimConfig is frozen, so one shared default instance is safe.
    def __init__(self, config: SimConfig = SimConfig()) -> None:
        self.config = config
        self.requests: list[RecordedRequest] = []
        self._faults: deque[_PendingFault] = deque()
        self._next_id = 1
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None
        self._stopping = False
        self._inflight: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and start serving; `port` 0 picks a free port (see `port`)."""
        if self._runner is not None:
            raise RuntimeError("UpstreamSim is already running")
        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/chat/completions", self._chat_completions),
                web.get("/v1/models", self._models),
                web.get("/health", self._health),
                web.post("/_sim/faults", self._post_faults),
                web.delete("/_sim/faults", self._delete_faults),
                web.get("/_sim/requests", self._get_requests),
            ]
        )
        # handler_cancellation makes aiohttp cancel the handler as soon as the
        # peer's connection is lost, which is how a disconnect is seen during
        # a TTFT wait or a stall, not only at the next write.
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=_SHUTDOWN_GRACE_SECONDS,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])
        self._stopping = False
        logger.info("upstream_sim.started host=%s port=%d", host, self._port)

    async def stop(self) -> None:
        """Stop serving; requests still in flight are cancelled. Idempotent."""
        runner = self._runner
        if runner is None:
            return
        self._stopping = True
        for task in list(self._inflight):
            task.cancel()
        await runner.cleanup()
        self._runner = None
        self._port = None
        logger.info("upstream_sim.stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._port is None:
            raise RuntimeError("UpstreamSim is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """The ``/v1`` root URL, as ``openai.AsyncOpenAI(base_url=...)`` wants it."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/v1"

    # -- faults and recordings ---------------------------------------------

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each hits the next `Fault.count` chat completion requests."""
        self._faults.extend(_PendingFault(f) for f in faults)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self._faults.clear()

    # `timeout` is part of the API tests call with; a polling wait needs its own deadline.
    async def wait_for(
        self,
        predicate: Callable[[RecordedRequest], bool],
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> RecordedRequest:
        """The oldest recorded request satisfying `predicate`, waiting up to `timeout` s.

        Raises TimeoutError if none does in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for recorded in self.requests:
                if predicate(recorded):
                    return recorded
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no recorded request matched within {timeout} s")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, _WAIT_POLL_SECONDS)):
                    await changed.wait()

    def answer_for(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The full text the sim answers to `messages` (before any ``max_tokens`` cut)."""
        config = self.config
        return "".join(compose_answer(messages, config.answer_tokens, config.quote_tokens))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _record(
        self, body: dict[str, Any], fault: Fault | None, client_port: int = 0
    ) -> RecordedRequest:
        recorded = RecordedRequest(
            id=self._next_id,
            body=body,
            received_at=time.monotonic(),
            fault=fault.kind if fault else None,
            client_port=client_port,
        )
        self._next_id += 1
        self.requests.append(recorded)
        if len(self.requests) > MAX_RECORDED_REQUESTS:
            del self.requests[: len(self.requests) - MAX_RECORDED_REQUESTS]
        self._notify()
        return recorded

    def _take_fault(self) -> Fault | None:
        if not self._faults:
            return None
        pending = self._faults[0]
        pending.remaining -= 1
        if pending.remaining <= 0:
            self._faults.popleft()
        return pending.fault

    def _mark_finished(self, recorded: RecordedRequest) -> None:
        recorded.finished_at = time.monotonic()
        self._notify()

    def _mark_disconnected(self, recorded: RecordedRequest) -> None:
        if self._stopping or recorded.finished_at is not None:
            return
        if recorded.disconnected_at is None:
            recorded.disconnected_at = time.monotonic()
            logger.info(
                "upstream_sim.client_disconnected id=%d tokens_sent=%d",
                recorded.id,
                recorded.tokens_sent,
            )
            self._notify()

    # -- chat completions --------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(_error_body(400, "request body is not JSON"), status=400)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return web.json_response(
                _error_body(400, "request body needs a 'messages' list"), status=400
            )

        config = self.config
        fault = self._take_fault()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        recorded = self._record(body, fault, int(peer[1]) if peer else 0)
        logger.debug(
            "upstream_sim.request id=%d stream=%s fault=%s",
            recorded.id,
            bool(body.get("stream")),
            recorded.fault,
        )
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            return await self._respond(request, body, config, fault, recorded)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client's connection is lost
            # (handler_cancellation=True); stop() cancels it too.
            self._mark_disconnected(recorded)
            raise
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _respond(
        self,
        request: web.Request,
        body: dict[str, Any],
        config: SimConfig,
        fault: Fault | None,
        recorded: RecordedRequest,
    ) -> web.StreamResponse:
        headers = {"x-request-id": f"sim-{recorded.id}"}
        if fault is not None and fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
        if fault is not None and fault.kind in ("rate_limit", "server_error", "status"):
            return await self._send_error(request, fault, recorded, headers)

        messages: list[Any] = body["messages"]
        tokens = compose_answer(messages, config.answer_tokens, config.quote_tokens)
        finish_reason = "stop"
        limit = _max_tokens(body)
        if limit is not None and limit < len(tokens):
            tokens = tokens[:limit]
            finish_reason = "length"
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = config.model
        usage = None
        if config.send_usage:
            prompt_tokens = prompt_token_count(messages)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            }

        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return await self._stream(
                request,
                config,
                fault,
                recorded,
                headers,
                tokens=tokens,
                model=model,
                finish_reason=finish_reason,
                usage=usage if include_usage else None,
            )
        return await self._complete(
            request,
            config,
            fault,
            recorded,
            headers,
            tokens=tokens,
            model=model,
            finish_reason=finish_reason,
            usage=usage,
        )

    async def _send_error(
        self,
        request: web.Request,
        fault: Fault,
        recorded: RecordedRequest,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        if fault.kind == "rate_limit":
            status = 429
            message = "Rate limit reached (simulated)."
            headers["Retry-After"] = f"{fault.retry_after:g}"
        elif fault.kind == "server_error":
            status = 500
            message = "The server had an error while processing your request (simulated)."
        else:
            status = fault.status
            message = f"Simulated HTTP {status}."
        resp = web.json_response(_error_body(status, message), status=status, headers=headers)
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            self._mark_disconnected(recorded)
            return resp
        self._mark_finished(recorded)
        return resp

    async def _complete(
        self,
        request: web.Request,
        config: SimConfig,
        fault: Fault | None,
        recorded: RecordedRequest,
        headers: dict[str, str],
        *,
        tokens: list[str],
        model: str,
        finish_reason: str,
        usage: dict[str, int] | None,
    ) -> web.StreamResponse:
        if fault is not None and fault.kind == "cut":
            return self._cut(request, recorded)
        if fault is not None and fault.kind == "stall":
            await asyncio.sleep(fault.stall_seconds)
        # A non-streaming answer arrives when the whole generation would be done.
        await asyncio.sleep(config.ttft + len(tokens) * _token_interval(config))
        payload: dict[str, object] = {
            "id": f"chatcmpl-sim{recorded.id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if usage is not None:
            payload["usage"] = usage
        resp = web.json_response(payload, headers=headers)
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            self._mark_disconnected(recorded)
            return resp
        recorded.first_token_at = time.monotonic()
        recorded.tokens_sent = len(tokens)
        self._mark_finished(recorded)
        return resp

    async def _stream(
        self,
        request: web.Request,
        config: SimConfig,
        fault: Fault | None,
        recorded: RecordedRequest,
        headers: dict[str, str],
        *,
        tokens: list[str],
        model: str,
        finish_reason: str,
        usage: dict[str, int] | None,
    ) -> web.StreamResponse:
        # Every chunk is encoded before the first write so the per-token work
        # is one sleep (when rate limited) and one write.
        role_chunk, token_chunks, tail = _encode_stream(
            f"chatcmpl-sim{recorded.id}", model, tokens, finish_reason, usage
        )
        interrupt_at: int | None = None
        if fault is not None and fault.kind in ("cut", "stall"):
            interrupt_at = min(fault.after_tokens, len(tokens))

        resp = web.StreamResponse(
            status=200,
            headers={
                **headers,
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
            },
        )
        loop = asyncio.get_running_loop()
        interval = _token_interval(config)
        try:
            await resp.prepare(request)
            await resp.write(role_chunk)
            if interrupt_at == 0 and fault is not None and fault.kind == "stall":
                await asyncio.sleep(fault.stall_seconds)
                interrupt_at = None
            if config.ttft > 0:
                await asyncio.sleep(config.ttft)
            started = loop.time()
            for index, chunk in enumerate(token_chunks):
                if index == interrupt_at and fault is not None:
                    if fault.kind == "cut":
                        return self._cut(request, recorded, resp)
                    await asyncio.sleep(fault.stall_seconds)
                    started = loop.time() - index * interval
                if interval:
                    delay = started + index * interval - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await resp.write(chunk)
                recorded.tokens_sent = index + 1
                if index == 0:
                    recorded.first_token_at = time.monotonic()
                    self._notify()
            if interrupt_at == len(token_chunks) and fault is not None:
                # The fault asked for more tokens than the answer has: it
                # strikes before the finish chunk.
                if fault.kind == "cut":
                    return self._cut(request, recorded, resp)
                await asyncio.sleep(fault.stall_seconds)
            await resp.write(tail)
            await resp.write_eof()
        except ConnectionError:
            self._mark_disconnected(recorded)
            return resp
        self._mark_finished(recorded)
        return resp

    def _cut(
        self,
        request: web.Request,
        recorded: RecordedRequest,
        resp: web.StreamResponse | None = None,
    ) -> web.StreamResponse:
        """Close the connection mid-response, as a crashing upstream would."""
        logger.info("upstream_sim.cut id=%d tokens_sent=%d", recorded.id, recorded.tokens_sent)
        transport = request.transport
        if transport is not None:
            # close(), not abort(): tokens already written still reach the client.
            transport.close()
        # aiohttp's attempt to finish this response fails quietly on the
        # closed transport; the handler has returned, so no cancellation
        # reaches it and the cut is not mistaken for a client disconnect.
        return resp if resp is not None else web.StreamResponse()

    # -- other endpoints -----------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        model = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "korero"}
        return web.json_response({"object": "list", "data": [model]})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def _post_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await request.json()
            if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
                raise ValueError("body must be a JSON list of fault objects")
            faults = [Fault.from_dict(d) for d in data]
        except (ValueError, TypeError) as exc:
            return web.json_response(_error_body(400, str(exc)), status=400)
        self.inject(*faults)
        return web.json_response({"queued": len(faults), "pending": len(self._faults)})

    async def _delete_faults(self, request: web.Request) -> web.StreamResponse:
        self.clear_faults()
        return web.json_response({"pending": 0})

    async def _get_requests(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([r.to_dict() for r in self.requests])

"""A simulated OpenAI-compatible upstream served over real HTTP.

(Longer than 400 lines: a third is this description of what the simulator
does; the rest is one class, the HTTP server, whose handlers share its fault
queue and recordings. Answers are composed in `_compose.py`, written in
OpenAI's wire format by `_wire.py`, configured by `_config.py`.)

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

With ``SimConfig(persona="assistant")`` (the ``upstream-sim`` command's
default) every other prompt gets a short reply that fits the intent named in
the system message's ``Routing:`` line (small talk, a complaint, a request for
a human, a booking question it cannot look up, a policy question it cannot
ground), never filler; see `korero.sim._assistant`.

Tools: when the request offers ``tools`` and the question needs live data (a
flight number, "my booking", "my flight"), the answer is OpenAI-style
``tool_calls`` (streamed deltas, parallel calls, finish reason
``tool_calls``); when the messages end with ``tool`` results, the answer is
built from their figures and cites each result's ``source`` label. A
``tool_call`` fault makes the next answer a call to a named tool whether or
not it was offered, to test how a server refuses it.

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
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from aiohttp import web

from korero._http_service import HTTPService
from korero.sim._assistant import plan_tool_calls
from korero.sim._compose import compose_answer, prompt_token_count
from korero.sim._config import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_MODEL,
    MAX_RECORDED_REQUESTS,
    Fault,
    FaultKind,
    RecordedRequest,
    SimConfig,
    _PendingFault,
)
from korero.sim._wire import (
    _encode_stream,
    _encode_tool_calls,
    _error_body,
    _max_tokens,
    _token_interval,
)

__all__ = [
    "DEFAULT_ANSWER_TOKENS",
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

# Upper bound on one sleep inside `wait_for`, so predicates on fields that
# change without a notification (tokens_sent) are still seen promptly.
_WAIT_POLL_SECONDS = 0.05
# How long `stop()` lets in-flight handlers wind down after cancelling them.
_SHUTDOWN_GRACE_SECONDS = 1.0


class _Call(NamedTuple):
    """One chat completion request being answered."""

    request: web.Request
    config: SimConfig
    fault: Fault | None
    recorded: RecordedRequest
    headers: dict[str, str]


class _Reply(NamedTuple):
    """What a chat completion answers, however it is sent (streamed or whole)."""

    tokens: list[str]
    model: str
    finish_reason: str
    usage: dict[str, int] | None
    tool_calls: list[dict[str, Any]]


class UpstreamSim(HTTPService):
    """A simulated OpenAI-compatible upstream on a real TCP port.

    Use it as ``async with UpstreamSim(SimConfig(ttft=0.1)) as sim:`` and give
    ``sim.base_url`` to ``openai.AsyncOpenAI``. `config` may be replaced
    between requests; each request reads it once, when it arrives.
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__()
        self.config = config or SimConfig()
        self.requests: list[RecordedRequest] = []
        self._faults: deque[_PendingFault] = deque()
        self._next_id = 1
        self._stopping = False
        self._inflight: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and start serving; `port` 0 picks a free port (see `port`)."""
        if self.running:
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
        await self._serve(app, host, port, grace=_SHUTDOWN_GRACE_SECONDS)
        self._stopping = False
        logger.info("upstream_sim.started host=%s port=%d", host, self.port)

    async def stop(self) -> None:
        """Stop serving; requests still in flight are cancelled. Idempotent."""
        if not self.running:
            return
        self._stopping = True
        for task in list(self._inflight):
            task.cancel()
        await self._close()
        logger.info("upstream_sim.stopped")

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
        return "".join(
            compose_answer(messages, config.answer_tokens, config.quote_tokens, config.persona)
        )

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
        offered = body.get("tools")
        planned = plan_tool_calls(messages, offered) if isinstance(offered, list) else []
        calls = [(name, json.dumps(arguments)) for name, arguments in planned]
        if fault is not None and fault.kind == "tool_call":
            calls = [(fault.tool, fault.arguments)]  # offered or not: a misbehaving model
        tool_calls: list[dict[str, Any]] = [
            {
                "id": f"call_sim{recorded.id}_{index}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            for index, (name, arguments) in enumerate(calls)
        ]
        if tool_calls:
            # One "token" per streamed piece of the calls (see `_encode_tool_calls`).
            tokens = [c["function"]["arguments"] for c in tool_calls for _ in range(3)]
        else:
            tokens = compose_answer(
                messages, config.answer_tokens, config.quote_tokens, config.persona
            )
        finish_reason = "tool_calls" if tool_calls else "stop"
        limit = _max_tokens(body)
        if limit is not None and limit < len(tokens) and not tool_calls:
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
            reply = _Reply(
                tokens, model, finish_reason, usage if include_usage else None, tool_calls
            )
            return await self._stream(_Call(request, config, fault, recorded, headers), reply)
        reply = _Reply(tokens, model, finish_reason, usage, tool_calls)
        return await self._complete(_Call(request, config, fault, recorded, headers), reply)

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
        if await self._send_whole(request, resp, recorded):
            self._mark_finished(recorded)
        return resp

    async def _send_whole(
        self, request: web.Request, resp: web.StreamResponse, recorded: RecordedRequest
    ) -> bool:
        """Send a whole (non-streamed) response; False, recorded, when the client left."""
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            self._mark_disconnected(recorded)
            return False
        return True

    async def _complete(self, call: _Call, reply: _Reply) -> web.StreamResponse:
        request, config, fault, recorded, headers = call
        tokens, model, finish_reason, usage, tool_calls = reply
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
                    "message": {
                        "role": "assistant",
                        "content": None if tool_calls else "".join(tokens),
                        "refusal": None,
                        **({"tool_calls": tool_calls} if tool_calls else {}),
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if usage is not None:
            payload["usage"] = usage
        resp = web.json_response(payload, headers=headers)
        if await self._send_whole(request, resp, recorded):
            recorded.first_token_at = time.monotonic()
            recorded.tokens_sent = len(tokens)
            self._mark_finished(recorded)
        return resp

    async def _stream(  # noqa: PLR0912 -- faults strike at any point of the stream
        self, call: _Call, reply: _Reply
    ) -> web.StreamResponse:
        request, config, fault, recorded, headers = call
        tokens, model, finish_reason, usage, tool_calls = reply
        # Every chunk is encoded before the first write so the per-token work
        # is one sleep (when rate limited) and one write.
        if tool_calls:
            role_chunk, token_chunks, tail = _encode_tool_calls(
                f"chatcmpl-sim{recorded.id}", model, tool_calls, usage
            )
        else:
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

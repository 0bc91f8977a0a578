"""OpenAI's wire format as the simulated upstream writes it: SSE chunks and errors."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from korero.sim._config import SimConfig

_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    409: ("invalid_request_error", None),
    422: ("invalid_request_error", None),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
}


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


def _encode_tool_calls(
    completion_id: str,
    model: str,
    tool_calls: list[dict[str, Any]],
    usage: dict[str, int] | None,
) -> tuple[bytes, list[bytes], bytes]:
    """SSE bytes of streamed tool calls, the way OpenAI sends them.

    Per call: a chunk with its index, id, type, name and empty arguments, then
    the arguments in two pieces; the finish reason is ``tool_calls``.
    """
    envelope = (
        f'data: {{"id":{json.dumps(completion_id)},"object":"chat.completion.chunk",'
        f'"created":{int(time.time())},"model":{json.dumps(model)},"choices":'
    )

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return envelope + json.dumps([choice], separators=(",", ":")) + "}\n\n"

    role_chunk = chunk({"role": "assistant", "content": None})
    pieces: list[bytes] = []
    for index, call in enumerate(tool_calls):
        head = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        pieces.append(chunk({"tool_calls": [head]}).encode())
        for part in (arguments[:half], arguments[half:]):
            delta = {"tool_calls": [{"index": index, "function": {"arguments": part}}]}
            pieces.append(chunk(delta).encode())
    tail = chunk({}, "tool_calls")
    if usage is not None:
        tail += envelope + f'[],"usage":{json.dumps(usage, separators=(",", ":"))}}}\n\n'
    tail += "data: [DONE]\n\n"
    return role_chunk.encode(), pieces, tail.encode()

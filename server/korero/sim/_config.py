"""The simulated upstream's configuration, faults and request records."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

DEFAULT_MODEL = "korero-sim-1"
DEFAULT_ANSWER_TOKENS = 40
MAX_RECORDED_REQUESTS = 10_000
ECHO_CHARS = 80

Persona = Literal["echo", "assistant"]
FaultKind = Literal["rate_limit", "server_error", "status", "cut", "stall", "delay", "tool_call"]
_FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))


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
    persona: Persona = "echo"
    """``echo``: answers of exactly `answer_tokens` tokens (echo + filler) that tests and
    benchmarks size on purpose; ``assistant``: a short relevant reply for every intent
    (what ``korero upstream-sim`` serves). Tool calls, tool-result answers and
    knowledge-base quotes are the same in both."""

    def __post_init__(self) -> None:
        if not self.ttft >= 0:
            raise ValueError(f"ttft must be >= 0, got {self.ttft}")
        if not self.tokens_per_second >= 0:
            raise ValueError(f"tokens_per_second must be >= 0, got {self.tokens_per_second}")
        if self.answer_tokens < 0:
            raise ValueError(f"answer_tokens must be >= 0, got {self.answer_tokens}")
        if self.persona not in ("echo", "assistant"):
            raise ValueError(f"persona must be echo or assistant, got {self.persona!r}")


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
    * ``delay``: wait ``seconds`` more before the response headers;
    * ``tool_call``: answer with one call to the tool named ``tool`` with
      ``arguments`` (JSON text), whether or not the request offers it — a
      model asking for a tool it may not use.
    """

    kind: FaultKind
    count: int = 1
    status: int = 500
    retry_after: float = 1.0
    after_tokens: int = 3
    stall_seconds: float = 3600.0
    seconds: float = 0.0
    tool: str = ""
    arguments: str = "{}"

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
        if self.kind == "tool_call" and not self.tool:
            raise ValueError("a tool_call fault needs the tool's name")

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
        for name in ("tool", "arguments"):
            if name in data:
                value = data[name]
                if not isinstance(value, str):
                    raise ValueError(f"fault field {name!r} must be a string")
                kwargs[name] = value
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

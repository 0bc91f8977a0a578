"""ghz configuration: the JSON config file, command-line overrides, call-data templates.

Key names are ghz's (`runner/config.go`): ``proto``, ``import-paths``, ``call``,
``host``, ``insecure``, ``total``, ``concurrency``, ``connections``,
``duration``, ``max-duration``, ``duration-stop``, ``rps``, ``timeout``,
``data``, ``metadata``, ``stream-interval``, ``stream-call-count``, ``name``,
``format``, ``output``, ``skip-first``, ``tags``. Durations are Go duration
strings (``"500ms"``, ``"1m30s"``).

Call data and metadata are Go templates in ghz; the subset every ghz user
reaches for is supported here: ``{{.WorkerID}}``, ``{{.RequestNumber}}``,
``{{.UUID}}``, ``{{.Timestamp}}``/``{{.TimestampUnix}}``/``...Milli``/``...Nano``,
the call's names (``{{.FullyQualifiedName}}``, ``{{.MethodName}}``,
``{{.ServiceName}}``, ``{{.InputName}}``, ``{{.OutputName}}``),
``{{newUUID}}``, ``{{randomString N}}`` and ``{{randomInt MIN MAX}}``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "CALLS",
    "CallSpec",
    "ConfigError",
    "GhzConfig",
    "Template",
    "format_duration",
    "parse_duration",
]

# ghz's defaults (runner/options.go newConfig and cmd flags).
DEFAULT_TOTAL = 200
DEFAULT_CONCURRENCY = 50
DEFAULT_TIMEOUT = 20.0


class ConfigError(ValueError):
    """A config file or flag that ghz would reject too."""


@dataclass(frozen=True)
class CallSpec:
    """A callable method: what the load tool needs to know about it."""

    full_name: str  # "package.Service.Method"
    kind: str  # "bidi" | "server_stream" | "unary"
    input_name: str
    output_name: str

    @property
    def service(self) -> str:
        return self.full_name.rsplit(".", 1)[0]

    @property
    def method(self) -> str:
        return self.full_name.rsplit(".", 1)[1]

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"


CALLS: dict[str, CallSpec] = {
    spec.full_name: spec
    for spec in (
        CallSpec("korero.chat.v1.ChatService.Chat", "bidi", "ChatRequest", "ChatResponse"),
        CallSpec(
            "korero.chat.v1.ChatService.SendMessage",
            "server_stream",
            "SendMessageRequest",
            "SendMessageResponse",
        ),
        CallSpec(
            "grpc.health.v1.Health.Check", "unary", "HealthCheckRequest", "HealthCheckResponse"
        ),
    )
}

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """A Go duration string (or a number of seconds) in seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"not a duration: {value!r}")
    text = value.strip()
    if text in ("", "0"):
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ConfigError(f"not a Go duration: {value!r} (e.g. 500ms, 10s, 1m30s)")
    return total


def format_duration(seconds: float) -> str:
    """Seconds as a short Go-style duration string."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


# -- templates ----------------------------------------------------------------------

_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")
_CHARSET = string.ascii_letters + string.digits


def _random_string(rng: random.Random, args: list[str]) -> str:
    length = int(args[0]) if args else 0
    if length <= 0:  # ghz: a random length in 2..16
        length = rng.randint(2, 16)
    return "".join(rng.choice(_CHARSET) for _ in range(length))


def _random_int(rng: random.Random, args: list[str]) -> str:
    low, high = (int(args[0]), int(args[1])) if len(args) == 2 else (0, 1 << 31)
    return str(rng.randrange(low, high)) if high > low else str(low)


_FUNCS: dict[str, Callable[[random.Random, list[str]], str]] = {
    "newUUID": lambda _rng, _args: str(uuid.uuid4()),
    "randomString": _random_string,
    "randomInt": _random_int,
}


@dataclass(frozen=True)
class Template:
    """A JSON value whose strings may hold ghz template actions; rendered per call."""

    source: str  # the JSON text, as ghz templates it
    has_actions: bool

    @classmethod
    def of(cls, value: object) -> Template:
        source = json.dumps(value, ensure_ascii=False)
        for action in _ACTION.findall(source):
            _check_action(action)
        return cls(source, bool(_ACTION.search(source)))

    def render(self, fields: Mapping[str, object], rng: random.Random) -> Any:
        if not self.has_actions:
            return json.loads(self.source)

        def substitute(match: re.Match[str]) -> str:
            action = match.group(1)
            if action.startswith("."):
                value = fields[action[1:]]
                text = str(value).lower() if isinstance(value, bool) else str(value)
            else:
                name, *args = action.split()
                text = _FUNCS[name](rng, args)
            return json.dumps(text, ensure_ascii=False)[1:-1]  # stays valid inside a JSON string

        return json.loads(_ACTION.sub(substitute, self.source))


_FIELDS = frozenset(
    {
        "WorkerID",
        "RequestNumber",
        "FullyQualifiedName",
        "MethodName",
        "ServiceName",
        "InputName",
        "OutputName",
        "IsClientStreaming",
        "IsServerStreaming",
        "Timestamp",
        "TimestampUnix",
        "TimestampUnixMilli",
        "TimestampUnixNano",
        "UUID",
    }
)


def _check_action(action: str) -> None:
    if action.startswith("."):
        if action[1:] not in _FIELDS:
            raise ConfigError(f"unknown template field {{{{{action}}}}}")
        return
    name, *args = action.split()
    if name not in _FUNCS:
        raise ConfigError(f"unknown template function {{{{{action}}}}}")
    if any(not re.fullmatch(r"-?\d+", a) for a in args):
        raise ConfigError(f"template function arguments must be integers: {{{{{action}}}}}")


def template_fields(spec: CallSpec, worker_id: str, request_number: int) -> dict[str, object]:
    """ghz's callTemplateData for one call."""
    now_ns = time.time_ns()
    return {
        "WorkerID": worker_id,
        "RequestNumber": request_number,
        "FullyQualifiedName": spec.full_name,
        "MethodName": spec.method,
        "ServiceName": spec.service.rsplit(".", 1)[-1],
        "InputName": spec.input_name,
        "OutputName": spec.output_name,
        "IsClientStreaming": spec.kind == "bidi",
        "IsServerStreaming": spec.kind in ("bidi", "server_stream"),
        "Timestamp": datetime.fromtimestamp(now_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "TimestampUnix": now_ns // 1_000_000_000,
        "TimestampUnixMilli": now_ns // 1_000_000,
        "TimestampUnixNano": now_ns,
        "UUID": str(uuid.uuid4()),
    }


# -- the config ---------------------------------------------------------------------


@dataclass(frozen=True)
class GhzConfig:
    """One run, in ghz's terms. Durations are seconds; 0 means unset."""

    call: str
    host: str = "127.0.0.1:50051"
    name: str = ""
    proto: str = ""
    import_paths: tuple[str, ...] = ()
    insecure: bool = True
    total: int = DEFAULT_TOTAL
    concurrency: int = DEFAULT_CONCURRENCY
    connections: int = 1
    duration: float = 0.0
    max_duration: float = 0.0
    duration_stop: str = "close"
    rps: float = 0.0
    timeout: float = DEFAULT_TIMEOUT
    data: Any = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    stream_interval: float = 0.0
    stream_call_count: int = 0
    skip_first: int = 0
    format: str = "json"
    output: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def spec(self) -> CallSpec:
        name = self.call.replace("/", ".")
        try:
            return CALLS[name]
        except KeyError:
            raise ConfigError(
                f"unknown call {self.call!r}; known: {', '.join(sorted(CALLS))}"
            ) from None

    @property
    def messages(self) -> list[Any]:
        """The call data as a list of messages (ghz: an array is a stream of messages)."""
        return list(self.data) if isinstance(self.data, list) else [self.data]

    def validate(self) -> GhzConfig:
        spec = self.spec
        if self.concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        if self.connections < 1:
            raise ConfigError("connections must be at least 1")
        if self.connections > self.concurrency:
            raise ConfigError("connections cannot be greater than concurrency (as in ghz)")
        if self.total < 0 or self.rps < 0 or self.timeout < 0:
            raise ConfigError("total, rps and timeout must not be negative")
        if self.total and self.total < self.concurrency and not self.duration:
            raise ConfigError("total cannot be smaller than concurrency (as in ghz)")
        if self.duration_stop not in ("close", "wait", "ignore"):
            raise ConfigError("duration-stop must be close, wait or ignore")
        if isinstance(self.data, list) and not self.data:
            raise ConfigError("data array must not be empty")
        if spec.kind != "bidi" and isinstance(self.data, list) and len(self.data) != 1:
            raise ConfigError(f"{spec.full_name} takes one request message, not an array")
        if spec.kind == "bidi" and spec.service == "korero.chat.v1.ChatService":
            first = self.messages[0]
            if not isinstance(first, dict) or "start" not in first:
                raise ConfigError("a Chat stream's first message must be {'start': {...}}")
        self.data_templates()  # template syntax errors surface now, not in a worker
        Template.of(self.metadata)
        return self

    def data_templates(self) -> list[Template]:
        return [Template.of(m) for m in self.messages]

    def to_options(self) -> dict[str, Any]:
        """The ``options`` object of ghz's JSON report (durations in nanoseconds)."""
        return {
            "call": self.spec.full_name,
            "host": self.host,
            **({"proto": self.proto} if self.proto else {}),
            **({"import-paths": list(self.import_paths)} if self.import_paths else {}),
            "insecure": self.insecure,
            **({"rps": int(self.rps)} if self.rps else {}),
            "load-schedule": "const",
            "load-start": 0,
            "load-end": 0,
            "load-step": 0,
            "load-step-duration": 0,
            "load-max-duration": 0,
            "concurrency": self.concurrency,
            "concurrency-schedule": "const",
            "concurrency-start": 1,
            "concurrency-end": 0,
            "concurrency-step": 0,
            "concurrency-step-duration": 0,
            "concurrency-max-duration": 0,
            **({"total": self.total} if self.total else {}),
            "connections": self.connections,
            **({"duration": _ns(self.duration)} if self.duration else {}),
            **({"timeout": _ns(self.timeout)} if self.timeout else {}),
            "data": self.data,
            "binary": False,
            **({"metadata": self.metadata} if self.metadata else {}),
            "CPUs": _cpus(),
            **({"name": self.name} if self.name else {}),
            **({"skipFirst": self.skip_first} if self.skip_first else {}),
        }


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _cpus() -> int:
    import os  # noqa: PLC0415 - only the report needs it

    return len(os.sched_getaffinity(0))


_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "call": ("call", str),
    "host": ("host", str),
    "name": ("name", str),
    "proto": ("proto", str),
    "import-paths": ("import_paths", lambda v: tuple(str(p) for p in v)),
    "insecure": ("insecure", bool),
    "total": ("total", int),
    "concurrency": ("concurrency", int),
    "connections": ("connections", int),
    "duration": ("duration", parse_duration),
    "max-duration": ("max_duration", parse_duration),
    "duration-stop": ("duration_stop", lambda v: str(v).lower()),
    "rps": ("rps", float),
    "qps": ("rps", float),  # older ghz releases
    "timeout": ("timeout", parse_duration),
    "data": ("data", lambda v: v),
    "metadata": ("metadata", lambda v: {str(k): str(x) for k, x in dict(v).items()}),
    "stream-interval": ("stream_interval", parse_duration),
    "stream-call-count": ("stream_call_count", int),
    "skip-first": ("skip_first", int),
    "format": ("format", str),
    "output": ("output", str),
    "tags": ("tags", lambda v: {str(k): str(x) for k, x in dict(v).items()}),
}
# ghz keys that are accepted (so real ghz configs load) but change nothing here.
_IGNORED = frozenset(
    {
        "protoset",
        "cacert",
        "cert",
        "key",
        "cname",
        "skipTLS",
        "skip-verify",
        "authority",
        "async",
        "load-schedule",
        "load-start",
        "load-end",
        "load-step",
        "load-step-duration",
        "load-max-duration",
        "concurrency-schedule",
        "concurrency-start",
        "concurrency-end",
        "concurrency-step",
        "concurrency-step-duration",
        "concurrency-max-duration",
        "connect-timeout",
        "keepalive",
        "cpus",
        "count-errors",
        "stream-call-duration",
        "stream-dynamic-messages",
        "reflect-metadata",
        "enable-compression",
        "lb-strategy",
        "debug",
        "data-file",
        "metadata-file",
        "binary-file",
    }
)


def load_config(path: str | Path | None, overrides: Mapping[str, Any]) -> GhzConfig:
    """Read a ghz JSON config (if given) and apply flag `overrides` (ghz key names)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} is not a JSON object")
    merged = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(merged) - set(_KEYS) - _IGNORED
    if unknown:
        raise ConfigError(f"unknown ghz config keys: {sorted(unknown)}")
    if "call" not in merged:
        raise ConfigError("call is required (config 'call' or --call)")
    kwargs: dict[str, Any] = {}
    for key, value in merged.items():
        if key in _KEYS:
            attr, convert = _KEYS[key]
            try:
                kwargs[attr] = convert(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"bad value for {key}: {value!r} ({exc})") from None
    return dataclasses.replace(GhzConfig(call=kwargs.pop("call")), **kwargs).validate()

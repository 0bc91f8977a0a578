"""What a tenant's tool is: `ToolSpec`, parsed and checked once from its JSON form.

A tool is an HTTP endpoint the model may ask Kōrero to call. Its JSON form
(what ``korero tools add --file`` reads and Redis stores)::

    {
      "name": "get_flight_status",
      "description": "Live status, gate and delay of one Aotea Air flight.",
      "parameters": {"type": "object", "properties": {...}, "required": [...]},
      "endpoint": "http://127.0.0.1:8090/v1/flights/{flight_number}",
      "method": "GET",
      "timeout": 3.0,
      "max_result_bytes": 16384,
      "intents": ["booking_lookup"],
      "personal": false,
      "session_arguments": {},
      "show_arguments": true,
      "show_results": false,
      "source": "Flight status service",
      "subject_argument": "flight_number"
    }

``{name}`` placeholders in the endpoint take the (URL-quoted) argument of
that name; other arguments go in the query string (GET) or a JSON body
(POST). ``session_arguments`` maps an argument to a session fact
(``booking_reference``, ``customer_name``): the server fills it from the
session and the model never sees or sets it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import jsonschema

__all__ = [
    "DEFAULT_MAX_RESULT_BYTES",
    "DEFAULT_TIMEOUT",
    "SESSION_FACTS",
    "SessionFact",
    "ToolSpec",
    "ToolSpecError",
]

DEFAULT_TIMEOUT = 5.0
"""Seconds one call may take when the spec names no timeout."""
DEFAULT_MAX_RESULT_BYTES = 16_384
"""Largest result body accepted when the spec names no cap."""

SessionFact = Literal["booking_reference", "customer_name"]
SESSION_FACTS: tuple[SessionFact, ...] = get_args(SessionFact)
_INTENTS = ("policy_question", "booking_lookup", "small_talk", "human_request", "complaint")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ToolSpecError(ValueError):
    """A tool's JSON form is not a usable tool."""


@dataclass(frozen=True)
class ToolSpec:
    """One tenant's tool: what the model sees, and how Kōrero executes it."""

    name: str
    """Function name the model calls (``[A-Za-z0-9_-]{1,64}``)."""
    description: str
    """What the tool does, for the model."""
    parameters: Mapping[str, Any]
    """JSON Schema of the arguments (including any session arguments)."""
    endpoint: str
    """HTTP URL template; ``{arg}`` placeholders take argument values."""
    method: Literal["GET", "POST"] = "GET"
    timeout: float = DEFAULT_TIMEOUT
    """Seconds one call may take, capped by what is left of the turn's deadline."""
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    """A larger result body is refused (the model is told it was too large)."""
    intents: tuple[str, ...] = ("booking_lookup",)
    """Router intents whose turns are offered this tool."""
    personal: bool = False
    """The result is about the customer: never cached, facts come from the session."""
    session_arguments: Mapping[str, SessionFact] = field(default_factory=dict)
    """Arguments filled by the server from the session, hidden from the model."""
    show_arguments: bool = False
    """Whether the customer's stream shows the call's arguments."""
    show_results: bool = False
    """Whether the customer's stream shows the call's result."""
    source: str = ""
    """Title of the data source in citations (default: the tool's name)."""
    subject_argument: str = ""
    """Argument whose value names what was looked up, in citations."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolSpec:  # noqa: PLR0912, PLR0915 -- one check per field, in field order
        """Parse and check a tool's JSON form; raise `ToolSpecError` when unusable."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ToolSpecError(f"unknown tool fields: {sorted(unknown)}")
        name = data.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolSpecError("'name' must be 1-64 characters of A-Z a-z 0-9 _ -")
        where = f"tool {name!r}"
        description = data.get("description")
        if not isinstance(description, str) or not description.strip():
            raise ToolSpecError(f"{where}: 'description' must be a non-empty string")
        parameters = data.get("parameters")
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise ToolSpecError(f"{where}: 'parameters' must be a JSON Schema of type object")
        try:
            jsonschema.Draft202012Validator.check_schema(parameters)
        except jsonschema.SchemaError as exc:
            raise ToolSpecError(
                f"{where}: 'parameters' is not a JSON Schema: {exc.message}"
            ) from exc
        endpoint = data.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise ToolSpecError(f"{where}: 'endpoint' must be an http(s) URL")
        properties = parameters.get("properties", {})
        for placeholder in _PLACEHOLDER.findall(endpoint):
            if placeholder not in properties:
                raise ToolSpecError(
                    f"{where}: endpoint placeholder {{{placeholder}}} is no parameter"
                )
        method = data.get("method", "GET")
        if method not in ("GET", "POST"):
            raise ToolSpecError(f"{where}: 'method' must be GET or POST")
        timeout = data.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ToolSpecError(f"{where}: 'timeout' must be a positive number of seconds")
        cap = data.get("max_result_bytes", DEFAULT_MAX_RESULT_BYTES)
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ToolSpecError(f"{where}: 'max_result_bytes' must be a positive integer")
        intents = data.get("intents", ["booking_lookup"])
        if not isinstance(intents, list) or not all(i in _INTENTS for i in intents):
            raise ToolSpecError(f"{where}: 'intents' must be a list of {', '.join(_INTENTS)}")
        session_arguments = data.get("session_arguments", {})
        if not isinstance(session_arguments, dict) or not all(
            isinstance(k, str) and k in properties and v in SESSION_FACTS
            for k, v in session_arguments.items()
        ):
            raise ToolSpecError(
                f"{where}: 'session_arguments' maps parameters to one of {', '.join(SESSION_FACTS)}"
            )
        personal = data.get("personal", False)
        flags = {k: data.get(k, False) for k in ("show_arguments", "show_results")}
        if not all(isinstance(v, bool) for v in (personal, *flags.values())):
            raise ToolSpecError(f"{where}: personal, show_arguments, show_results are booleans")
        if session_arguments and not personal:
            raise ToolSpecError(f"{where}: a tool with session_arguments must be personal")
        source = data.get("source", "")
        subject = data.get("subject_argument", "")
        if not isinstance(source, str) or not isinstance(subject, str):
            raise ToolSpecError(f"{where}: 'source' and 'subject_argument' are strings")
        if subject and subject not in properties:
            raise ToolSpecError(f"{where}: 'subject_argument' {subject!r} is no parameter")
        return cls(
            name=name,
            description=description.strip(),
            parameters=parameters,
            endpoint=endpoint,
            method=method,
            timeout=float(timeout),
            max_result_bytes=cap,
            intents=tuple(intents),
            personal=personal,
            session_arguments=dict(session_arguments),
            show_arguments=flags["show_arguments"],
            show_results=flags["show_results"],
            source=source,
            subject_argument=subject,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what `from_dict` reads)."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
            "endpoint": self.endpoint,
            "method": self.method,
            "timeout": self.timeout,
            "max_result_bytes": self.max_result_bytes,
            "intents": list(self.intents),
            "personal": self.personal,
            "session_arguments": dict(self.session_arguments),
            "show_arguments": self.show_arguments,
            "show_results": self.show_results,
            "source": self.source,
            "subject_argument": self.subject_argument,
        }

    @property
    def source_title(self) -> str:
        """The data source's name in citations."""
        return self.source or self.name

    def model_parameters(self) -> dict[str, Any]:
        """The argument schema the model sees: session arguments removed."""
        hidden = set(self.session_arguments)
        schema = dict(self.parameters)
        if hidden:
            props = dict(schema.get("properties", {}))
            for name in hidden:
                props.pop(name, None)
            schema["properties"] = props
            required = [r for r in schema.get("required", []) if r not in hidden]
            if required:
                schema["required"] = required
            else:
                schema.pop("required", None)
        return schema

    def to_openai(self) -> dict[str, Any]:
        """The entry in a chat completion's ``tools`` list."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.model_parameters(),
            },
        }

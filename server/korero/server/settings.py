"""Settings: the one place that reads the environment.

One module on purpose (it is longer than 400 lines): it is the one list the
settings table and `korero serve --help` are generated from.

Every knob is a field of a frozen dataclass with its environment variable,
default and description declared next to it, so `korero serve --help` and the
settings table in docs/operating.md come from the same source. Values are
typed here, at the edge: enum-like words are `Literal`s checked on reading,
lists are tuples, rate tiers are parsed JSON, and "off" is `None`. Every
component receives only the group (or fields) it uses, by keyword.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

__all__ = [
    "AuthSettings",
    "CacheSettings",
    "EngineSettings",
    "HandoffSettings",
    "HandoffTriggerName",
    "KnowledgeSettings",
    "LLMSettings",
    "ObservabilitySettings",
    "PostgresSettings",
    "PromptSettings",
    "RateLimitSettings",
    "RateTiers",
    "RedisSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "TLSSettings",
    "ToolSettings",
    "WebhookSettings",
    "WebhookTarget",
    "env_reference",
]

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_WS_LISTEN = "127.0.0.1:8081"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/korero"
DEFAULT_LLM_BASE_URL = "http://127.0.0.1:8088/v1"
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly, concise customer-support assistant. Answer the "
    "customer's question using the facts you are given. If you do not know, "
    "say so and offer to connect them with a human agent."
)


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used."""


AuthMode = Literal["on", "off"]
LimiterRedisDown = Literal["local", "closed"]
TraceExporter = Literal["none", "otlp", "console"]
HandoffTriggerName = Literal[
    "human_request",
    "sentiment",
    "fallback",
    "low_confidence",
    "complaint",
    "client_request",
    "agent_pick",
]
ALL_HANDOFF_TRIGGERS: tuple[HandoffTriggerName, ...] = get_args(HandoffTriggerName)

_TIER_FIELDS = (
    "session_messages_per_minute",
    "tenant_requests_per_minute",
    "tenant_tokens_per_minute",
)


@dataclass(frozen=True)
class RateTiers:
    """Named rate tiers (partial overrides of the default limits) and who is on which."""

    tiers: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Tier name -> {limit field: value}; missing fields take the default limits."""
    tenants: Mapping[str, str] = field(default_factory=dict)
    """Tenant -> tier name (every name is one of `tiers`)."""

    @classmethod
    def parse(cls, raw: str) -> RateTiers:
        """`{"tiers": {"gold": {...}}, "tenants": {"t1": "gold"}}`; raises ValueError."""
        if not raw.strip():
            return cls()
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("expected a JSON object")
        tiers: dict[str, dict[str, int]] = {}
        for name, spec in (doc.get("tiers") or {}).items():
            if not isinstance(spec, dict) or set(spec) - set(_TIER_FIELDS):
                raise ValueError(f"tier {name!r} may only set {', '.join(_TIER_FIELDS)}")
            values = {k: int(v) for k, v in spec.items()}
            if any(v < 0 for v in values.values()):
                raise ValueError(f"tier {name!r} has a negative limit")
            tiers[name] = values
        tenants = {str(t): str(n) for t, n in (doc.get("tenants") or {}).items()}
        unknown = sorted(set(tenants.values()) - set(tiers))
        if unknown:
            raise ValueError(f"tenants refer to unknown tiers: {', '.join(unknown)}")
        return cls(tiers, tenants)

    def __str__(self) -> str:
        if not self.tiers and not self.tenants:
            return ""
        return json.dumps({"tiers": self.tiers, "tenants": self.tenants})


def _env(
    name: str,
    default: Any,
    doc: str,
    *,
    aliases: tuple[str, ...] = (),
    parse: Callable[[str], Any] | None = None,
) -> Any:
    meta = {"env": name, "doc": doc, "aliases": aliases, "parse": parse}
    if isinstance(default, RateTiers):
        return field(default_factory=RateTiers, metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def _choice(kind: Any) -> Callable[[str], Any]:
    allowed = get_args(kind)

    def parse(raw: str) -> Any:
        word = raw.strip().lower()
        if word not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return word

    return parse


def _off_or(raw: str) -> str | None:
    """An address, or None for `off`."""
    return None if raw.strip().lower() == "off" else raw.strip()


def _words(raw: str) -> tuple[str, ...]:
    """A comma-separated list."""
    return tuple(w.strip() for w in raw.split(",") if w.strip())


def _path(raw: str) -> Path:
    return Path(raw)


_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def _redis_url(raw: str) -> str:
    scheme, _, rest = raw.strip().partition("://")
    if scheme.lower() not in _REDIS_SCHEMES:
        raise ValueError(f"the scheme must be one of {', '.join(_REDIS_SCHEMES)}")
    if scheme.lower().endswith("+cluster") and rest.partition("/")[2].split("?")[0] not in (
        "",
        "0",
    ):
        raise ValueError("Redis Cluster has only database 0")
    return raw.strip()


def _seconds_or_off(raw: str) -> float | None:
    """Seconds (> 0), or None for `off`."""
    if raw.strip().lower() == "off":
        return None
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number of seconds, or `off`")
    return value


def _workers(raw: str) -> int | None:
    """A process count, or None for `auto` (one per available core)."""
    word = raw.strip().lower()
    if word == "auto":
        return None
    count = int(word)
    if count < 1:
        raise ValueError("must be at least 1, or `auto`")
    return count


def _triggers(raw: str) -> tuple[HandoffTriggerName, ...]:
    """A comma-separated list of trigger names; `none` for no automatic handoff."""
    if raw.strip().lower() == "none":
        return ()
    words = _words(raw.lower())
    unknown = sorted(set(words) - set(ALL_HANDOFF_TRIGGERS))
    if unknown:
        raise ValueError(
            f"unknown triggers {', '.join(unknown)}; use {', '.join(ALL_HANDOFF_TRIGGERS)}"
        )
    return tuple(t for t in ALL_HANDOFF_TRIGGERS if t in words)


def _score(raw: str) -> float:
    """A sentiment score bound, -1 to 1."""
    value = float(raw)
    if not -1.0 <= value <= 1.0:
        raise ValueError("must be between -1 and 1")
    return value


def _skill_map(raw: str) -> dict[str, str]:
    """`intent=queue,...`: which queue (agent skill) an intent's handoffs wait in."""
    pairs: dict[str, str] = {}
    for item in _words(raw):
        intent, sep, queue = item.partition("=")
        if not sep or not intent.strip() or not queue.strip():
            raise ValueError(f"expected intent=queue, got {item!r}")
        pairs[intent.strip()] = queue.strip()
    return pairs


@dataclass(frozen=True)
class WebhookTarget:
    """One CRM / ticketing endpoint of a tenant."""

    url: str
    secret: str
    """Key of the HMAC-SHA256 signature."""
    events: tuple[str, ...] = ()
    """Event types it receives (empty: all)."""

    @property
    def target_id(self) -> str:
        """A short stable id for the URL (names its queue in Redis)."""
        import hashlib  # noqa: PLC0415 - only here

        return hashlib.sha256(self.url.encode()).hexdigest()[:12]


def _webhook_targets(raw: str) -> dict[str, tuple[WebhookTarget, ...]]:
    """JSON `{"tenant": [{"url": ..., "secret": ..., "events": [...]}]}`."""
    if not raw.strip():
        return {}
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object of tenant -> list of targets")
    out: dict[str, tuple[WebhookTarget, ...]] = {}
    for tenant, targets in doc.items():
        if not isinstance(targets, list):
            raise ValueError(f"tenant {tenant!r}: expected a list of targets")
        parsed = []
        for t in targets:
            if not isinstance(t, dict) or not t.get("url") or not t.get("secret"):
                raise ValueError(f"tenant {tenant!r}: every target needs `url` and `secret`")
            if not str(t["url"]).startswith(("http://", "https://")):
                raise ValueError(f"tenant {tenant!r}: {t['url']!r} is not an http(s) URL")
            parsed.append(
                WebhookTarget(str(t["url"]), str(t["secret"]), tuple(t.get("events") or ()))
            )
        out[str(tenant)] = tuple(parsed)
    return out


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(raw: str) -> int | None:
    """A duration such as `90d`, `12h`, `30m`, `45s` or plain seconds; `off` is None."""
    word = raw.strip().lower()
    if word in ("", "off", "none"):
        return None
    unit = _UNITS.get(word[-1])
    number = word[:-1] if unit is not None else word
    try:
        value = int(number) * (unit or 1)
    except ValueError:
        raise ValueError("expected a duration such as 90d, 12h, 30m or 45s") from None
    if value <= 0:
        raise ValueError("must be positive")
    return value


@dataclass(frozen=True)
class ServerSettings:
    """The gRPC listener and process lifecycle."""

    listen: str = _env("KORERO_LISTEN", DEFAULT_LISTEN, "gRPC listen address HOST:PORT")
    """Where the gRPC server listens; port 0 picks a free port."""
    shutdown_grace: float = _env(
        "KORERO_SHUTDOWN_GRACE", 10.0, "seconds turns in flight may finish after SIGTERM"
    )
    """After SIGTERM, how long turns in flight may run before streams are ended."""
    heartbeat_interval: float = _env(
        "KORERO_HEARTBEAT_INTERVAL", 15.0, "seconds of silence before a heartbeat event"
    )
    """An idle Chat stream gets a heartbeat event this often (keeps proxies from closing it)."""
    first_frame_timeout: float = _env(
        "KORERO_FIRST_FRAME_TIMEOUT", 30.0, "seconds a new stream may wait before `start`"
    )
    """A Chat stream that sends no first frame within this time is closed."""
    log_level: str = _env("KORERO_LOG_LEVEL", "INFO", "log level (DEBUG, INFO, WARNING)")
    """Log level of the structured (key=value) logs."""
    ws_listen: str | None = _env(
        "KORERO_WS_LISTEN",
        DEFAULT_WS_LISTEN,
        "WebSocket adapter (and chat page) HOST:PORT, or `off`",
        parse=_off_or,
    )
    """Where the WebSocket adapter listens (behind Envoy's `/ws/` route); None: off."""
    web_root: Path | None = _env(
        "KORERO_WEB_ROOT",
        None,
        "directory of the built chat page served at / (empty: none)",
        parse=_path,
    )
    """The WebSocket listener serves this directory's files (clients/web/dist) at `/`."""
    workers: int | None = _env(
        "KORERO_WORKERS",
        None,
        "server processes sharing the ports (empty or `auto`: one per core)",
        parse=_workers,
    )
    """`korero serve` runs this many processes on the same ports (SO_REUSEPORT);
    None counts the cores this process may use (CPU affinity and cgroup quota).
    `--workers` overrides it."""
    max_connection_age: float | None = _env(
        "KORERO_MAX_CONNECTION_AGE",
        600.0,
        "seconds before a client connection is asked to reconnect (GOAWAY; `off`: never)",
        parse=_seconds_or_off,
    )
    """gRPC `max_connection_age`: a client's new calls move to a fresh connection (which a
    load balancer may send elsewhere) while its open streams carry on, so long-lived
    connections do not pin a client to the instance it met first."""
    stream_queue_events: int = _env(
        "KORERO_STREAM_QUEUE_EVENTS",
        64,
        "events queued for a stream whose client is not reading",
    )
    """Per stream; beyond it queued text deltas are merged, then the stream ends
    with RESOURCE_EXHAUSTED `STREAM_QUEUE_FULL`."""
    stream_queue_bytes: int = _env(
        "KORERO_STREAM_QUEUE_BYTES",
        65536,
        "bytes of events queued for a stream whose client is not reading",
    )
    """Per stream; beyond it the stream ends with RESOURCE_EXHAUSTED `STREAM_QUEUE_FULL`."""
    opens_in_flight: int = _env(
        "KORERO_OPENS_IN_FLIGHT",
        32,
        "session opens (create or resume) one process runs at once",
    )
    """Keep it below KORERO_REDIS_MAX_CONNECTIONS: each open holds a Redis connection
    for one round trip, and turns in flight need theirs (policy/pacing.py)."""
    opens_queue: int = _env(
        "KORERO_OPENS_QUEUE",
        1024,
        "session opens waiting for a place; beyond it RESOURCE_EXHAUSTED with RetryInfo",
    )
    """Each waits at most KORERO_REDIS_TIMEOUT; a full queue or a longer wait refuses the
    open with RESOURCE_EXHAUSTED `SESSION_OPENS_BUSY` and a RetryInfo delay."""

    def __post_init__(self) -> None:
        if self.opens_in_flight < 1:
            raise SettingsError("KORERO_OPENS_IN_FLIGHT must be at least 1")
        if self.opens_queue < 0:
            raise SettingsError("KORERO_OPENS_QUEUE must be 0 or more")


@dataclass(frozen=True)
class TLSSettings:
    """TLS, and optionally mutual TLS, on the gRPC and WebSocket listeners."""

    cert_file: Path | None = _env(
        "KORERO_TLS_CERT",
        None,
        "PEM certificate (chain) the listeners present; empty: plaintext",
        parse=_path,
    )
    """Set together with KORERO_TLS_KEY to serve TLS (gRPC and the WebSocket/page listener)."""
    key_file: Path | None = _env(
        "KORERO_TLS_KEY", None, "PEM private key of KORERO_TLS_CERT", parse=_path
    )
    """Read once at start; restart (one instance at a time) to rotate."""
    client_ca_file: Path | None = _env(
        "KORERO_TLS_CLIENT_CA",
        None,
        "PEM CA bundle: clients must present a certificate it signed (mutual TLS)",
        parse=_path,
    )
    """Mutual TLS: a client without a certificate signed by one of these CAs is refused
    during the handshake (e.g. only Envoy, holding such a certificate, may connect)."""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise SettingsError("KORERO_TLS_CERT and KORERO_TLS_KEY are set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise SettingsError("KORERO_TLS_CLIENT_CA needs KORERO_TLS_CERT and KORERO_TLS_KEY")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class RedisSettings:
    """The Redis holding all session state."""

    url: str = _env(
        "REDIS_URL",
        DEFAULT_REDIS_URL,
        "Redis URL for session state (`redis+cluster://host:port[,host:port]` for a cluster)",
        parse=_redis_url,
    )
    """redis://, rediss:// or unix:// for one server; redis+cluster:// or
    rediss+cluster:// with one or more seed nodes for Redis Cluster."""
    max_connections: int = _env(
        "KORERO_REDIS_MAX_CONNECTIONS", 64, "size of the blocking Redis connection pool"
    )
    """Callers wait for a free connection instead of failing when all are in use."""
    timeout: float = _env("KORERO_REDIS_TIMEOUT", 2.0, "seconds per Redis call before UNAVAILABLE")
    """Socket timeout, and the longest wait for a pooled connection."""
    failover_wait: float = _env(
        "KORERO_REDIS_FAILOVER_WAIT",
        5.0,
        "seconds a Redis Cluster call keeps retrying while a primary fails over",
    )
    """Redis Cluster only: a call on a failed primary's slots is retried every 0.25 s
    until its replica takes over (about cluster-node-timeout + 1 s), or this long."""


@dataclass(frozen=True)
class PostgresSettings:
    """PostgreSQL, the system of record for sessions and messages."""

    url: str | None = _env(
        "KORERO_POSTGRES_URL",
        DEFAULT_POSTGRES_URL,
        "PostgreSQL URL for long-term history, or `off` (Redis only)",
        aliases=("POSTGRES_URL",),
        parse=_off_or,
    )
    """postgresql:// URL; `off` keeps history in Redis only (nothing survives a Redis loss)."""
    pool_size: int = _env("KORERO_POSTGRES_POOL_SIZE", 8, "connections in the PostgreSQL pool")
    """The outbox writer and the history reads share this pool."""
    timeout: float = _env(
        "KORERO_POSTGRES_TIMEOUT", 2.0, "seconds per PostgreSQL call before UNAVAILABLE"
    )
    """Bounds a read (ListMessages, rehydration) and one write batch."""
    commit_wait: float = _env(
        "KORERO_POSTGRES_COMMIT_WAIT",
        1.0,
        "seconds `done` waits for the turn's PostgreSQL commit",
    )
    """While PostgreSQL answers, `done` is sent after the turn is committed there; when it does
    not within this time (or is known to be down) `done` goes out with the turn held in the Redis
    outbox, written when PostgreSQL returns."""
    drain_interval: float = _env(
        "KORERO_OUTBOX_DRAIN_INTERVAL", 0.25, "seconds between outbox sweeps when idle"
    )
    """The writer also wakes at once when a turn begins or ends on this instance."""
    probe_interval: float = _env(
        "KORERO_POSTGRES_PROBE_INTERVAL",
        2.0,
        "seconds without an outbox write before PostgreSQL is pinged (health `korero.history`)",
    )
    """With nothing to write the writer would never learn that PostgreSQL went away (or came
    back, or was never there at startup): it pings it (`SELECT 1`) this often instead, so
    `korero.history` follows PostgreSQL within about this time plus `KORERO_POSTGRES_TIMEOUT`."""
    history_retention: int | None = _env(
        "KORERO_HISTORY_RETENTION",
        None,
        "delete sessions idle longer than this (e.g. 90d; empty: keep)",
        parse=parse_age,
    )
    """Used by `korero sessions purge` when no --older-than is given (run it daily from cron);
    empty: history is kept until deleted."""


@dataclass(frozen=True)
class LLMSettings:
    """The OpenAI-compatible upstream."""

    base_url: str = _env(
        "KORERO_LLM_BASE_URL",
        DEFAULT_LLM_BASE_URL,
        "OpenAI-compatible base URL (default: the simulated upstream)",
        aliases=("OPENAI_BASE_URL",),
    )
    """Base URL ending in /v1; the default is `korero upstream-sim` on its default port."""
    api_key: str = _env(
        "KORERO_LLM_API_KEY", "sim", "API key for the upstream", aliases=("OPENAI_API_KEY",)
    )
    """Bearer token sent to the upstream."""
    model: str = _env("KORERO_LLM_MODEL", "korero-sim-1", "model name sent to the upstream")
    """Model name; shown to clients in the turn-started event."""
    max_tokens: int = _env("KORERO_LLM_MAX_TOKENS", 512, "most tokens in one answer")
    """Answer length cap; hitting it ends the turn with FINISH_REASON_LENGTH."""
    temperature: float = _env("KORERO_LLM_TEMPERATURE", 0.2, "sampling temperature")
    """Sampling temperature."""
    first_token_timeout: float = _env(
        "KORERO_LLM_FIRST_TOKEN_TIMEOUT", 15.0, "seconds to wait for the first token"
    )
    """Per attempt; a stalled upstream ends the turn with DEADLINE_EXCEEDED."""
    inter_token_timeout: float = _env(
        "KORERO_LLM_INTER_TOKEN_TIMEOUT",
        20.0,
        "seconds to wait for the next token once the answer has begun",
    )
    """A stall mid-answer ends the turn with DEADLINE_EXCEEDED `INTER_TOKEN_TIMEOUT`."""
    max_retries: int = _env(
        "KORERO_LLM_MAX_RETRIES", 2, "retries of a failed call, only before the first token"
    )
    """Retries of retryable failures (429, 5xx, connection); never after text was sent."""
    retry_backoff: float = _env("KORERO_LLM_RETRY_BACKOFF", 0.2, "seconds before the first retry")
    """Base of the exponential backoff; an upstream Retry-After wins when it fits the deadline."""


@dataclass(frozen=True)
class EngineSettings:
    """Conversation behaviour."""

    tenant: str = _env("KORERO_TENANT", "default", "tenant for all keys until auth is configured")
    """Every Redis key starts with the tenant."""
    system_prompt: str = _env(
        "KORERO_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT, "system prompt put before every turn"
    )
    """The system prompt."""
    prompt_version: str = _env("KORERO_PROMPT_VERSION", "v1", "version label of the system prompt")
    """Recorded with each answer (and part of cache keys later)."""
    turn_timeout: float = _env(
        "KORERO_TURN_TIMEOUT", 120.0, "seconds a turn may take when the client sets no deadline"
    )
    """Overall deadline of one turn; a shorter gRPC deadline from the client wins."""
    turn_lease: float = _env(
        "KORERO_TURN_LEASE",
        5.0,
        "seconds a turn holds its session without renewing (crash recovery time)",
    )
    """A running turn renews its lease every third of this; a turn whose instance
    died is declared failed (`TURN_ORPHANED`) by the next message once it runs out."""
    store_resolve_seconds: float = _env(
        "KORERO_STORE_RESOLVE_SECONDS",
        10.0,
        "seconds a Redis write of unknown outcome is retried before STORE_UNAVAILABLE",
    )
    """A begin or finish that timed out is resolved (given up, or sent again) before
    the client hears anything; never past the client's deadline."""
    history_max_messages: int = _env(
        "KORERO_HISTORY_MAX_MESSAGES", 200, "messages kept in a session's stored history"
    )
    """Older messages are trimmed from Redis."""
    prompt_history_messages: int = _env(
        "KORERO_PROMPT_HISTORY_MESSAGES", 20, "most recent messages put into the prompt"
    )
    """How much history goes into the prompt."""
    session_ttl: int = _env("KORERO_SESSION_TTL", 7 * 24 * 3600, "seconds a quiet session is kept")
    """Every turn renews it."""
    max_message_bytes: int = _env(
        "KORERO_MAX_MESSAGE_BYTES", 8000, "largest user message, in UTF-8 bytes"
    )
    """Larger messages get INVALID_ARGUMENT."""
    coalesce_window_ms: float = _env(
        "KORERO_COALESCE_WINDOW_MS", 30.0, "window merging text deltas after the first"
    )
    """The first delta of a turn goes out at once; later ones are merged over this window."""
    coalesce_max_bytes: int = _env(
        "KORERO_COALESCE_MAX_BYTES", 2048, "flush merged text at this many bytes"
    )
    """A merged delta is sent early when it reaches this size."""
    early_upstream: bool = _env(
        "KORERO_EARLY_UPSTREAM",
        True,
        "send the upstream request while the turn's Redis round trips run (true/false)",
    )
    """For sessions whose last turn ended on this instance; see conversation/early.py. A
    resend after a reconnect can make an early request redundant: it is closed before its
    first token, but it reached the upstream (counted as `refused`)."""
    detach_grace: float = _env(
        "KORERO_DETACH_GRACE", 5.0, "seconds a turn keeps generating after its client vanished"
    )
    """A client that drops mid-answer may resume (`after_seq`) within this time and get the rest;
    after it the turn is cancelled and the upstream request closed. An explicit `cancel` is
    immediate."""
    event_log_max_events: int = _env(
        "KORERO_EVENT_LOG_MAX_EVENTS", 2000, "events kept per session for resume"
    )
    """The replay log (`kr:{t:s}:events`) keeps at most this many of a session's latest events."""
    event_log_max_age: int = _env(
        "KORERO_EVENT_LOG_MAX_AGE", 3600, "seconds an event is kept for resume"
    )
    """Older events leave the replay log; a cursor behind them is told replay was truncated."""


@dataclass(frozen=True)
class AuthSettings:
    """Who may call: API keys (in Redis) and JWTs."""

    mode: AuthMode = _env(
        "KORERO_AUTH", "off", "`on` requires a bearer token on every call", parse=_choice(AuthMode)
    )
    """`off`: every caller is KORERO_TENANT. `on`: API key or JWT required."""
    open_methods: tuple[str, ...] = _env(
        "KORERO_AUTH_OPEN_METHODS",
        ("/grpc.health.v1.Health/", "/grpc.reflection."),
        "comma-separated method prefixes that need no token",
        parse=_words,
    )
    """Health checks and reflection stay open so probes and grpcurl work."""
    key_cache_seconds: float = _env(
        "KORERO_AUTH_KEY_CACHE_SECONDS", 5.0, "seconds a verified API key is cached in-process"
    )
    """A revoked key stops working within this time."""
    jwt_secret: str | None = _env("KORERO_JWT_SECRET", None, "shared secret for HS256 JWTs")
    """Set this or KORERO_JWT_JWKS_URL to accept JWTs."""
    jwks_url: str | None = _env("KORERO_JWT_JWKS_URL", None, "JWKS URL for RS256/ES256 JWTs")
    """Keys are cached; an unknown `kid` refetches at most once per refetch interval."""
    jwt_algorithms: tuple[str, ...] | None = _env(
        "KORERO_JWT_ALGORITHMS",
        None,
        "accepted JWT algorithms (default HS256 or RS256,ES256)",
        parse=_words,
    )
    """Pinned algorithm list; `none` is never accepted."""
    jwt_audience: str = _env("KORERO_JWT_AUDIENCE", "korero", "required JWT `aud`")
    """Tokens for another audience are rejected."""
    jwt_issuer: str | None = _env(
        "KORERO_JWT_ISSUER", None, "required JWT `iss` (empty: not checked)"
    )
    """Pin the issuer in production."""
    jwt_tenant_claim: str = _env("KORERO_JWT_TENANT_CLAIM", "tenant", "JWT claim naming the tenant")
    """A token without it is rejected."""
    jwks_refetch_interval: float = _env(
        "KORERO_JWKS_REFETCH_INTERVAL", 60.0, "least seconds between JWKS fetches"
    )
    """Bounds fetches caused by tokens with unknown key ids."""
    failures_per_peer: int = _env(
        "KORERO_AUTH_FAILURES_PER_PEER",
        30,
        "failed authentications per client address per minute before throttling",
    )
    """Past it, calls from that address that would need a credential check get
    RESOURCE_EXHAUSTED `AUTH_THROTTLED` with RetryInfo (0: no limit)."""
    failures_per_tenant: int = _env(
        "KORERO_AUTH_FAILURES_PER_TENANT",
        300,
        "failed authentications naming one tenant per minute before throttling",
    )
    """Past it, unknown API keys of that tenant are refused without a Redis lookup;
    keys that verified before still pass (0: no limit)."""


@dataclass(frozen=True)
class RateLimitSettings:
    """Per-session, per-tenant and LLM-token limits, enforced in Redis."""

    enabled: bool = _env("KORERO_RATE_LIMITS", True, "enforce rate limits (true/false)")
    """Turn all limits off (not recommended in production)."""
    session_messages_per_minute: int = _env(
        "KORERO_SESSION_MESSAGES_PER_MINUTE", 30, "messages per session per minute"
    )
    """Default tier: messages one session may send per minute."""
    tenant_requests_per_minute: int = _env(
        "KORERO_TENANT_REQUESTS_PER_MINUTE", 600, "calls + messages per tenant per minute"
    )
    """Default tier: new calls (streams, unary) and messages per tenant per minute."""
    tenant_tokens_per_minute: int = _env(
        "KORERO_TENANT_TOKENS_PER_MINUTE", 200_000, "LLM tokens per tenant per minute"
    )
    """Default tier: prompt + completion tokens per tenant per minute."""
    tiers: RateTiers = _env(
        "KORERO_RATE_TIERS",
        RateTiers(),
        'JSON: per-tenant tiers, e.g. {"tiers":{"gold":{...}},"tenants":{"t1":"gold"}}',
        parse=RateTiers.parse,
    )
    """Named tiers overriding the defaults, and which tenant is on which tier."""
    window_seconds: float = _env(
        "KORERO_RATE_WINDOW_SECONDS", 60.0, "the window the per-minute limits refill over"
    )
    """Buckets refill evenly over this window (60 s: the limits are per minute)."""
    redis_down: LimiterRedisDown = _env(
        "KORERO_RATE_LIMIT_REDIS_DOWN",
        "local",
        "`local` (fail open to a per-process limiter) or `closed`",
        parse=_choice(LimiterRedisDown),
    )
    """What to do when Redis cannot be reached for a limit check."""


@dataclass(frozen=True)
class ObservabilitySettings:
    """Metrics and traces."""

    metrics_listen: str | None = _env(
        "KORERO_METRICS_LISTEN",
        "127.0.0.1:9464",
        "Prometheus /metrics HOST:PORT (`off` to disable)",
        parse=_off_or,
    )
    """Where Prometheus scrapes `/metrics`."""
    trace_exporter: TraceExporter = _env(
        "KORERO_TRACE_EXPORTER", "none", "`none`, `otlp` or `console`", parse=_choice(TraceExporter)
    )
    """Spans are only recorded when an exporter is configured."""
    otlp_endpoint: str = _env(
        "KORERO_OTLP_ENDPOINT", "http://127.0.0.1:4318/v1/traces", "OTLP/HTTP traces endpoint"
    )
    """Used when KORERO_TRACE_EXPORTER=otlp."""
    service_name: str = _env("KORERO_SERVICE_NAME", "korero", "service.name of traces")
    """OpenTelemetry resource attribute."""
    price_input_per_mtok: float = _env(
        "KORERO_PRICE_INPUT_PER_MTOK", 0.0, "USD per million prompt tokens (cost metric)"
    )
    """Feeds the estimated-cost metric."""
    price_output_per_mtok: float = _env(
        "KORERO_PRICE_OUTPUT_PER_MTOK", 0.0, "USD per million completion tokens (cost metric)"
    )
    """Feeds the estimated-cost metric."""
    ops_token: str | None = _env(
        "KORERO_OPS_TOKEN",
        None,
        "admin token for the live ops page and /ops/stats (empty: both off)",
    )
    """Bearer token the ops page sends to `/ops/stats` on the WebSocket listener."""


@dataclass(frozen=True)
class KnowledgeSettings:
    """The per-tenant knowledge base and retrieval."""

    top_k: int = _env("KORERO_KB_TOP_K", 3, "knowledge-base chunks put into the prompt")
    """At most this many chunks (best first) are retrieved for a question."""
    min_score: float = _env(
        "KORERO_KB_MIN_SCORE", 0.2, "normalized BM25 score a chunk needs to count as relevant"
    )
    """BM25 divided by the best score the query could reach (0..1); see docs/retrieval.md."""
    snippet_chars: int = _env(
        "KORERO_KB_SNIPPET_CHARS", 240, "longest snippet in a citation event, in characters"
    )
    """Citation events carry a short excerpt of the cited section."""


@dataclass(frozen=True)
class PromptSettings:
    """The token budget of the prompt."""

    context_window: int = _env(
        "KORERO_CONTEXT_WINDOW_TOKENS", 8192, "model context window, in tokens"
    )
    """Prompt plus answer must fit in this many (estimated) tokens."""
    answer_reserve: int = _env(
        "KORERO_ANSWER_RESERVE_TOKENS", 512, "tokens kept free for the answer"
    )
    """Subtracted from the context window before the prompt is filled."""
    knowledge_tokens: int = _env(
        "KORERO_PROMPT_KB_TOKENS", 1500, "most tokens of knowledge-base excerpts in a prompt"
    )
    """Retrieved chunks are added best first while they fit in this share."""
    summary_tokens: int = _env(
        "KORERO_SUMMARY_MAX_TOKENS", 200, "longest summary of older turns, in tokens"
    )
    """max_tokens of the summarization call; older turns that do not fit are summarized."""


@dataclass(frozen=True)
class CacheSettings:
    """The tenant-scoped response cache."""

    enabled: bool = _env("KORERO_CACHE_ENABLED", True, "cache answers to general policy questions")
    """Only turns the router marks cacheable (no personal data, no follow-up) are cached."""
    ttl: int = _env("KORERO_CACHE_TTL", 86400, "seconds a cached answer is kept")
    """Entries also die when a knowledge-base ingest changes the KB version."""
    lock_timeout: float = _env(
        "KORERO_CACHE_LOCK_TIMEOUT", 20.0, "seconds identical misses wait for the first one"
    )
    """Single flight: the first miss holds a lock this long; the others wait for its answer."""


@dataclass(frozen=True)
class HandoffSettings:
    """Escalation to human agents: triggers, queues, the agent desk."""

    enabled: bool = _env("KORERO_HANDOFF", True, "hand conversations to human agents (true/false)")
    """Off: no trigger fires and `RequestHandoff` is refused; the bot answers everything."""
    triggers: tuple[HandoffTriggerName, ...] = _env(
        "KORERO_HANDOFF_TRIGGERS",
        ALL_HANDOFF_TRIGGERS,
        "triggers that hand a conversation to a human (comma-separated, or `none`)",
        parse=_triggers,
    )
    """Any of human_request, sentiment, fallback, low_confidence, complaint,
    client_request, agent_pick."""
    sentiment_message: float = _env(
        "KORERO_HANDOFF_SENTIMENT_MESSAGE",
        -0.75,
        "a message scoring at or below this (VADER compound, -1..1) escalates",
        parse=_score,
    )
    """One very negative message is enough."""
    sentiment_trend: float = _env(
        "KORERO_HANDOFF_SENTIMENT_TREND",
        -0.4,
        "the mean of the last messages at or below this escalates",
        parse=_score,
    )
    """A conversation that keeps going badly escalates before any single message is extreme."""
    sentiment_window: int = _env(
        "KORERO_HANDOFF_SENTIMENT_WINDOW", 3, "customer messages the sentiment trend averages"
    )
    """The trend needs at least two scored messages."""
    fallbacks: int = _env("KORERO_HANDOFF_FALLBACKS", 2, "fallback answers in a row that escalate")
    """A fallback is the bot's "I couldn't find anything" answer."""
    low_confidence: float = _env(
        "KORERO_HANDOFF_LOW_CONFIDENCE", 0.4, "router confidence below which a message is unsure"
    )
    """See context/router.py for how confidence is computed."""
    low_confidence_turns: int = _env(
        "KORERO_HANDOFF_LOW_CONFIDENCE_TURNS", 3, "unsure messages in a row that escalate"
    )
    """Counted over consecutive customer messages, this one included."""
    queues: dict[str, str] = _env(
        "KORERO_HANDOFF_QUEUES",
        {"complaint": "complaints", "booking_lookup": "bookings"},
        "intent=queue pairs routing handoffs to agent skills (others: general)",
        parse=_skill_map,
    )
    """Agents serve `general` plus the queues named in their skills."""
    offer_timeout: float = _env(
        "KORERO_HANDOFF_OFFER_TIMEOUT", 30.0, "seconds an agent has to accept an offer"
    )
    """Then the conversation is offered to the next agent."""
    agent_grace: float = _env(
        "KORERO_HANDOFF_AGENT_GRACE", 30.0, "seconds a disconnected agent keeps conversations"
    )
    """After that they go back to the front of their queue."""
    default_wait: float = _env(
        "KORERO_HANDOFF_DEFAULT_WAIT", 120.0, "seconds of estimated wait before any is measured"
    )
    """Estimates use a moving average of measured waits once there are some."""
    sweep_interval: float = _env(
        "KORERO_HANDOFF_SWEEP_INTERVAL", 1.0, "seconds between checks of offers and graces"
    )
    """Each instance with agents connected runs the checks; they are idempotent."""
    relay_log_max: int = _env(
        "KORERO_HANDOFF_RELAY_LOG_MAX", 1000, "handoff events kept per session for the relay"
    )
    """The relay log of a session is trimmed to about this many entries."""


@dataclass(frozen=True)
class WebhookSettings:
    """Signed CRM / ticketing webhooks on handoff events."""

    targets: dict[str, tuple[WebhookTarget, ...]] = _env(
        "KORERO_WEBHOOKS",
        {},
        'JSON: {"tenant": [{"url": "https://…", "secret": "…", "events": [...]}]}',
        parse=_webhook_targets,
    )
    """Per-tenant endpoints; events: handoff.requested, handoff.agent_joined, handoff.closed."""
    max_attempts: int = _env(
        "KORERO_WEBHOOK_MAX_ATTEMPTS", 8, "attempts before a delivery is dead-lettered"
    )
    """`korero webhooks retry` puts dead letters back in their queue."""
    backoff: float = _env("KORERO_WEBHOOK_BACKOFF", 1.0, "seconds before the first retry")
    """Doubles per attempt, with full jitter, up to KORERO_WEBHOOK_BACKOFF_MAX."""
    backoff_max: float = _env("KORERO_WEBHOOK_BACKOFF_MAX", 300.0, "longest wait between retries")
    """Cap of the exponential backoff."""
    timeout: float = _env("KORERO_WEBHOOK_TIMEOUT", 5.0, "seconds per delivery attempt")
    """A receiver slower than this counts as a failed attempt."""


@dataclass(frozen=True)
class ToolSettings:
    """The tool loop (live data through tenant-configured tools; see docs/tools.md)."""

    max_rounds: int = _env(
        "KORERO_TOOLS_MAX_ROUNDS", 3, "most rounds of tool calls in one turn (0: tools off)"
    )
    """After this many rounds the model is asked again without tools, so it must answer."""
    cache_seconds: float = _env(
        "KORERO_TOOLS_CACHE_SECONDS", 5.0, "seconds a tenant's tool list is kept in-process"
    )
    """Saves a Redis round trip per turn; `korero tools add|remove` applies within this time."""
    result_cache_seconds: float = _env(
        "KORERO_TOOLS_RESULT_CACHE_SECONDS",
        60.0,
        "seconds a non-personal tool's result is reused (0: off)",
    )
    """Same tenant, tool config and arguments within this time: no HTTP call. Personal
    tools and failed calls are never cached."""


@dataclass(frozen=True)
class Settings:
    """All settings, grouped by concern."""

    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    postgres: PostgresSettings = field(default_factory=PostgresSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: RateLimitSettings = field(default_factory=RateLimitSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    knowledge: KnowledgeSettings = field(default_factory=KnowledgeSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    handoff: HandoffSettings = field(default_factory=HandoffSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    tools: ToolSettings = field(default_factory=ToolSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from `environ` (default: `os.environ`)."""
        env = os.environ if environ is None else environ
        groups = {g.name: _read_group(_group_defaults(g), env) for g in dataclasses.fields(cls)}
        return cls(**groups)


_G = TypeVar("_G")


def _group_defaults(group: dataclasses.Field[Any]) -> Any:
    factory = cast(Callable[[], Any], group.default_factory)
    return factory()


def _read_group(defaults: _G, env: Mapping[str, str]) -> _G:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(defaults):  # type: ignore[arg-type]
        names = (f.metadata["env"], *f.metadata["aliases"])
        raw = next((env[n] for n in names if env.get(n, "") != ""), None)
        if raw is None:
            continue
        parse = f.metadata["parse"]
        if parse is not None:
            try:
                values[f.name] = parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{f.metadata['env']}={raw!r}: {exc}") from None
        else:
            values[f.name] = _convert(f.metadata["env"], raw, type(getattr(defaults, f.name)))
    return dataclasses.replace(defaults, **values)  # type: ignore[type-var]


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _convert(name: str, raw: str, kind: type) -> Any:
    if kind is str or kind is type(None):  # text, or text that is off (None) by default
        return raw
    if kind is bool:
        word = raw.strip().lower()
        if word not in _TRUE | _FALSE:
            raise SettingsError(
                f"{name}={raw!r} is not a boolean (true/false, 1/0, yes/no, on/off)"
            )
        return word in _TRUE
    try:
        value: float = kind(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if not value >= 0:  # negative or NaN
        raise SettingsError(f"{name}={raw!r} must be a non-negative number")
    return value


def _shown(value: Any) -> str:
    """A default as an operator would write it in the environment."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, dict):
        if all(isinstance(v, str) for v in value.values()):
            return ",".join(f"{k}={v}" for k, v in value.items())
        return json.dumps(value) if value else ""
    return str(value)


def env_reference() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, in declaration order."""
    rows: list[tuple[str, str, str]] = []
    for group in dataclasses.fields(Settings):
        defaults = _group_defaults(group)
        for f in dataclasses.fields(defaults):
            names = " / ".join((f.metadata["env"], *f.metadata["aliases"]))
            shown = _shown(getattr(defaults, f.name))
            rows.append((names, shown if len(shown) < 40 else "(long text)", f.metadata["doc"]))
    return rows

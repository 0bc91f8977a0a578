"""Small pieces: settings parsing and delta coalescing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from korero.server.conversation.coalesce import DeltaCoalescer
from korero.server.policy.gate import scope_for_method
from korero.server.settings import Settings, SettingsError, env_reference


def test_settings_defaults_follow_conventions() -> None:
    s = Settings.from_env({})
    assert s.server.listen == "127.0.0.1:50051"
    assert s.redis.url == "redis://127.0.0.1:6379/0"
    assert s.engine.tenant == "default"


def test_settings_read_environment_and_aliases() -> None:
    s = Settings.from_env(
        {
            "KORERO_LISTEN": "0.0.0.0:6000",
            "OPENAI_BASE_URL": "https://api.example/v1",
            "OPENAI_API_KEY": "sk-test",
            "KORERO_LLM_MAX_TOKENS": "64",
            "KORERO_COALESCE_WINDOW_MS": "12.5",
        }
    )
    assert s.server.listen == "0.0.0.0:6000"
    assert s.llm.base_url == "https://api.example/v1"
    assert s.llm.api_key == "sk-test"
    assert s.llm.max_tokens == 64
    assert s.engine.coalesce_window_ms == 12.5
    # the project's own name wins over the alias
    assert Settings.from_env({"KORERO_LLM_MODEL": "a", "OPENAI_MODEL": "b"}).llm.model == "a"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KORERO_LLM_MAX_TOKENS", "many"),
        ("KORERO_SHUTDOWN_GRACE", "-1"),
        ("KORERO_REDIS_TIMEOUT", "nan"),
        ("KORERO_AUTH", "maybe"),
        ("KORERO_TRACE_EXPORTER", "jaeger"),
        ("KORERO_RATE_LIMIT_REDIS_DOWN", "open"),
        ("KORERO_RATE_TIERS", "{not json"),
        ("KORERO_RATE_TIERS", '{"tiers": {"gold": {"requests": 5}}}'),
        ("KORERO_RATE_TIERS", '{"tiers": {}, "tenants": {"t1": "gold"}}'),
    ],
)
def test_bad_settings_are_named_in_the_error(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_settings_are_typed_at_the_edge() -> None:
    """Lists, tiers, enum-like words and `off` are parsed once, in settings."""
    s = Settings.from_env(
        {
            "KORERO_AUTH": "ON",
            "KORERO_AUTH_OPEN_METHODS": "/grpc.health.v1.Health/, /x.Y/",
            "KORERO_JWT_ALGORITHMS": "RS256,ES256",
            "KORERO_RATE_TIERS": '{"tiers": {"gold": {"tenant_requests_per_minute": 5}},'
            ' "tenants": {"acme": "gold"}}',
            "KORERO_METRICS_LISTEN": "off",
            "KORERO_WS_LISTEN": "OFF",
            "KORERO_WEB_ROOT": "clients/web/dist",
        }
    )
    assert s.auth.mode == "on"
    assert s.auth.open_methods == ("/grpc.health.v1.Health/", "/x.Y/")
    assert s.auth.jwt_algorithms == ("RS256", "ES256")
    assert s.auth.jwt_secret is None  # unset secrets are None, not ""
    assert s.limits.tiers.tiers == {"gold": {"tenant_requests_per_minute": 5}}
    assert s.limits.tiers.tenants == {"acme": "gold"}
    assert s.observability.metrics_listen is None
    assert s.server.ws_listen is None
    assert s.server.web_root == Path("clients/web/dist")


@pytest.mark.parametrize(
    ("method", "scope"),
    [
        ("/korero.chat.v1.ChatService/Chat", "chat:write"),
        ("/korero.chat.v1.ChatService/SendMessage", "chat:write"),
        ("/korero.chat.v1.ChatService/GetSession", "chat:read"),
        ("/korero.chat.v1.ChatService/ListMessages", "chat:read"),
        ("/korero.agent.v1.AgentDeskService/Connect", "agent:write"),
        ("/grpc.health.v1.Health/Check", None),
        ("not a method", None),
    ],
)
def test_scopes_follow_from_the_method(method: str, scope: str | None) -> None:
    assert scope_for_method(method) == scope


def test_every_setting_is_documented() -> None:
    rows = env_reference()
    assert len(rows) >= 20
    assert all(doc for _, _, doc in rows)
    reference = Path(__file__).parents[2] / "docs" / "operating.md"
    text = reference.read_text(encoding="utf-8")
    for name, _, _ in rows:
        assert name.split(" / ")[0] in text, f"{name} missing from docs/operating.md"


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], Any]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeScheduler:
    """A clock with timers that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], Any]) -> FakeTimer:
        timer = FakeTimer(when, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [t for t in self.timers if t.when <= self.now and not t.cancelled]
        self.timers = [t for t in self.timers if t not in due]
        for timer in due:
            timer.callback()


async def test_coalescer_sends_first_piece_at_once_then_merges() -> None:
    sent: list[str] = []
    clock = FakeScheduler()
    c = DeltaCoalescer(sent.append, window=0.05, max_bytes=1000, scheduler=clock)
    c.add("Hello")
    assert sent == ["Hello"]
    for word in (" there", ",", " how", " are"):
        c.add(word)
    clock.advance(0.049)
    assert sent == ["Hello"]  # held inside the window
    clock.advance(0.002)
    assert sent == ["Hello", " there, how are"]
    c.add(" you")
    c.flush()
    assert sent == ["Hello", " there, how are", " you"]


async def test_coalescer_flushes_early_when_full() -> None:
    sent: list[str] = []
    c = DeltaCoalescer(sent.append, window=10.0, max_bytes=8)
    c.add("a")
    c.add("bcd")
    c.add("efghij")
    assert sent == ["a", "bcdefghij"]
    c.close()


async def test_coalescer_with_zero_window_sends_everything() -> None:
    sent: list[str] = []
    c = DeltaCoalescer(sent.append, window=0.0, max_bytes=1000)
    for piece in "abc":
        c.add(piece)
    assert sent == ["a", "b", "c"]

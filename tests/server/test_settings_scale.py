"""Settings of running at scale: workers, TLS, connection age, Redis Cluster URLs, ops token."""

from __future__ import annotations

from pathlib import Path

import pytest

from korero.server.settings import Settings, SettingsError
from korero.server.storage.connection import is_cluster_url


def test_scale_settings_are_typed_at_the_edge() -> None:
    s = Settings.from_env(
        {
            "KORERO_WORKERS": "3",
            "KORERO_TLS_CERT": "/etc/korero/tls.crt",
            "KORERO_TLS_KEY": "/etc/korero/tls.key",
            "KORERO_TLS_CLIENT_CA": "/etc/korero/ca.crt",
            "KORERO_MAX_CONNECTION_AGE": "off",
            "REDIS_URL": "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
            "KORERO_OPS_TOKEN": "s3cret",
            "KORERO_JWT_SECRET": "jwt-secret",  # text that is off (None) by default
        }
    )
    assert s.server.workers == 3
    assert s.tls.enabled
    assert s.tls.client_ca_file == Path("/etc/korero/ca.crt")
    assert s.server.max_connection_age is None
    assert is_cluster_url(s.redis.url)
    assert s.observability.ops_token == "s3cret"
    assert s.auth.jwt_secret == "jwt-secret"
    defaults = Settings.from_env({})
    assert defaults.server.workers is None  # one per core
    assert not defaults.tls.enabled
    assert defaults.server.max_connection_age == 600.0
    assert defaults.observability.ops_token is None
    assert Settings.from_env({"KORERO_WORKERS": "auto"}).server.workers is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KORERO_WORKERS": "0"}, "KORERO_WORKERS"),
        ({"KORERO_TLS_CERT": "/x.crt"}, "KORERO_TLS_KEY"),
        ({"KORERO_TLS_CLIENT_CA": "/ca.crt"}, "KORERO_TLS_CLIENT_CA"),
        ({"KORERO_MAX_CONNECTION_AGE": "0"}, "KORERO_MAX_CONNECTION_AGE"),
        ({"REDIS_URL": "http://127.0.0.1:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis+cluster://127.0.0.1:7000/2"}, "REDIS_URL"),
    ],
)
def test_bad_scale_settings_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)

"""Authentication on a real server: API keys in Redis, HS256 and JWKS JWTs,
tenant isolation, open health/reflection, and the `korero keys` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from korero.chat.v1 import chat_pb2 as pb
from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.server.policy.tokens import ApiKeyStore, JwksCache
from korero.sim import UpstreamSim
from tests.conftest import RedisProcess, make_settings
from tests.helpers import kinds, run_turn

SECRET = "test-secret-long-enough-for-hs512-" + "x" * 30


def hs256(claims: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    base = {"aud": "korero", "exp": int(time.time()) + 300, "sub": "user-1"}
    return jwt.encode({**base, **claims}, secret, algorithm="HS256", headers=headers or None)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture
async def auth_server(redis_url: str, sim: UpstreamSim) -> AsyncIterator[KoreroServer]:
    settings = make_settings(redis_url, sim.base_url, auth__mode="on", auth__jwt_secret=SECRET)
    app = await KoreroServer.start(settings)
    yield app
    await app.shutdown(grace=0)


async def _keys(app: KoreroServer) -> ApiKeyStore:
    return ApiKeyStore(app.store.redis)


async def _rejected(target: str, metadata: list[tuple[str, str]]) -> ChatError:
    async with ChatClient(target, metadata=metadata) as client:
        with pytest.raises(ChatError) as info:
            await client.conversation()
    return info.value


async def test_no_credentials_is_unauthenticated(auth_server: KoreroServer) -> None:
    error = await _rejected(f"127.0.0.1:{auth_server.port}", [])
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == "CREDENTIALS_MISSING"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Basic dXNlcjpwYXNz", "CREDENTIALS_MALFORMED"),
        ("Bearer ", "CREDENTIALS_MALFORMED"),
        ("Bearer hello", "CREDENTIALS_INVALID"),
        ("Bearer kr_acme_" + "x" * 43, "API_KEY_INVALID"),
        ("Bearer a.b.c", "TOKEN_INVALID"),
    ],
)
async def test_invalid_credentials_are_unauthenticated(
    auth_server: KoreroServer, header: str, reason: str
) -> None:
    error = await _rejected(f"127.0.0.1:{auth_server.port}", [("authorization", header)])
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == reason


async def test_api_key_works_and_revocation_stops_it(auth_server: KoreroServer) -> None:
    keys = await _keys(auth_server)
    key, record = await keys.create("acme", "support-bot")
    target = f"127.0.0.1:{auth_server.port}"
    async with ChatClient(target, metadata=bearer(key)) as client:
        conversation = await client.conversation()
        assert kinds(await run_turn(conversation, "hello", "k1"))[-1] == "done"
        await conversation.close()
    # The session lives under the key's tenant.
    raw = await auth_server.store.redis.exists(f"kr:{{acme:{conversation.session_id}}}:meta")
    assert raw == 1
    assert await keys.revoke("acme", record.key_id)
    error = await _rejected(target, bearer(key))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == "API_KEY_REVOKED"


async def test_key_naming_another_tenant_cannot_be_forged(auth_server: KoreroServer) -> None:
    keys = await _keys(auth_server)
    key, _ = await keys.create("acme")
    forged = key.replace("kr_acme_", "kr_globex_", 1)  # same secret, other tenant
    error = await _rejected(f"127.0.0.1:{auth_server.port}", bearer(forged))
    assert error.reason == "API_KEY_INVALID", (error.code, error.message)


async def test_hs256_jwt_works(auth_server: KoreroServer) -> None:
    token = hs256({"tenant": "initech"})
    async with ChatClient(f"127.0.0.1:{auth_server.port}", metadata=bearer(token)) as client:
        conversation = await client.conversation()
        assert kinds(await run_turn(conversation, "hello", "j1"))[-1] == "done"
    assert await auth_server.store.redis.exists(f"kr:{{initech:{conversation.session_id}}}:meta")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (
            jwt.encode(
                {"aud": "korero", "tenant": "t", "exp": int(time.time()) + 60},
                None,
                algorithm="none",
            ),
            "TOKEN_ALGORITHM_REJECTED",
        ),
        (hs256({"tenant": "t", "exp": int(time.time()) - 60}), "TOKEN_EXPIRED"),
        (hs256({"tenant": "t", "aud": "someone-else"}), "TOKEN_AUDIENCE_REJECTED"),
        (
            hs256({"tenant": "t"}, secret="another-secret-long-enough-for-hs256"),
            "TOKEN_SIGNATURE_INVALID",
        ),
        (hs256({}), "TOKEN_TENANT_MISSING"),
        (hs256({"tenant": "Bad Tenant!"}), "TOKEN_TENANT_MISSING"),
        (
            jwt.encode({"aud": "korero", "tenant": "t"}, SECRET, algorithm="HS256"),
            "TOKEN_INVALID",
        ),  # no exp
        (
            jwt.encode(
                {"aud": "korero", "tenant": "t", "exp": int(time.time()) + 60},
                SECRET,
                algorithm="HS512",
            ),
            "TOKEN_ALGORITHM_REJECTED",
        ),
    ],
    ids=[
        "alg-none",
        "expired",
        "wrong-audience",
        "bad-signature",
        "no-tenant",
        "bad-tenant",
        "no-exp",
        "unpinned-alg",
    ],
)
async def test_bad_jwts_are_unauthenticated(
    auth_server: KoreroServer, token: str, reason: str
) -> None:
    error = await _rejected(f"127.0.0.1:{auth_server.port}", bearer(token))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == reason


@pytest.mark.slow
async def test_health_and_reflection_stay_open(auth_server: KoreroServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{auth_server.port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    proc = await asyncio.create_subprocess_exec(
        grpcurl,
        "-plaintext",
        f"127.0.0.1:{auth_server.port}",
        "list",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert "korero.chat.v1.ChatService" in out.decode()


@pytest.mark.slow
async def test_grpcurl_with_a_bearer_token(auth_server: KoreroServer) -> None:
    key, _ = await (await _keys(auth_server)).create("acme")
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    request = '{"message": {"client_message_id": "g1", "text": "Hi"}}'
    target = f"127.0.0.1:{auth_server.port}"
    method = "korero.chat.v1.ChatService/SendMessage"
    proc = await asyncio.create_subprocess_exec(
        grpcurl,
        "-plaintext",
        "-H",
        f"authorization: Bearer {key}",
        "-d",
        request,
        target,
        method,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert '"finishReason": "FINISH_REASON_STOP"' in out.decode()
    proc = await asyncio.create_subprocess_exec(
        grpcurl,
        "-plaintext",
        "-d",
        request,
        target,
        method,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert "Unauthenticated" in out.decode()


async def test_scopes_limit_what_a_key_may_call(auth_server: KoreroServer) -> None:
    keys = await _keys(auth_server)
    writer, _ = await keys.create("acme", scopes=("chat:write",))
    reader, _ = await keys.create("acme", scopes=("chat:read",))
    target = f"127.0.0.1:{auth_server.port}"
    async with ChatClient(target, metadata=bearer(writer)) as client:
        conversation = await client.conversation()
        await run_turn(conversation, "hello", "s1")
        with pytest.raises(ChatError) as info:
            await client.get_session(conversation.session_id)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert info.value.reason == "SCOPE_MISSING"
    async with ChatClient(target, metadata=bearer(reader)) as client:
        session = await client.get_session(conversation.session_id)
        assert session.turn_count == 1
        error = await _rejected(target, bearer(reader))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED


async def test_tenants_cannot_see_each_other(
    auth_server: KoreroServer, redis_proc: RedisProcess
) -> None:
    target = f"127.0.0.1:{auth_server.port}"
    keys = await _keys(auth_server)
    key_a, _ = await keys.create("tenant-a")
    token_b = hs256({"tenant": "tenant-b"})
    sessions: dict[str, str] = {}
    for tenant, meta in (("tenant-a", bearer(key_a)), ("tenant-b", bearer(token_b))):
        async with ChatClient(target, metadata=meta) as client:
            for i in range(2):
                conversation = await client.conversation(
                    metadata=pb.SessionMetadata(customer_name=f"{tenant} customer {i}")
                )
                await run_turn(conversation, f"question from {tenant}", f"{tenant}-{i}")
                sessions[f"{tenant}-{i}"] = conversation.session_id
                await conversation.close()
    # B cannot read or resume A's session: to B it does not exist (NOT_FOUND, never a leak).
    async with ChatClient(target, metadata=bearer(token_b)) as client:
        with pytest.raises(ChatError) as info:
            await client.get_session(sessions["tenant-a-0"])
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ChatError) as info:
            await client.list_messages(sessions["tenant-a-0"])
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ChatError) as info:
            await client.conversation(session_id=sessions["tenant-a-0"])
        assert info.value.reason == "SESSION_NOT_FOUND"
    # Every key in Redis carries its tenant prefix.
    keys_in_redis = [k.decode() for k in redis_proc.client().keys("*")]
    assert keys_in_redis
    for key in keys_in_redis:
        assert key.startswith(("kr:{tenant-a", "kr:{tenant-b")), key
    for name, sid in sessions.items():
        tenant = name.rsplit("-", 1)[0]
        other = "tenant-b" if tenant == "tenant-a" else "tenant-a"
        assert f"kr:{{{tenant}:{sid}}}:meta" in keys_in_redis
        assert not any(f"{other}:{sid}" in k for k in keys_in_redis)


@pytest.fixture
async def jwks_server() -> AsyncIterator[tuple[str, rsa.RSAPrivateKey, list[float]]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": "key-1", "alg": "RS256", "use": "sig"})
    hits: list[float] = []

    async def handle(_: web.Request) -> web.Response:
        hits.append(time.monotonic())
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/.well-known/jwks.json", private, hits
    await runner.cleanup()


async def test_jwks_tokens_and_unknown_key_ids(
    redis_url: str, sim: UpstreamSim, jwks_server: tuple[str, Any, list[float]]
) -> None:
    url, private, hits = jwks_server
    settings = make_settings(
        redis_url,
        sim.base_url,
        auth__mode="on",
        auth__jwks_url=url,
        auth__jwt_issuer="https://id.example",
        auth__jwks_refetch_interval=60.0,
    )
    app = await KoreroServer.start(settings)
    target = f"127.0.0.1:{app.port}"

    def rs256(kid: str, **claims: Any) -> str:
        body = {
            "aud": "korero",
            "iss": "https://id.example",
            "tenant": "acme",
            "exp": int(time.time()) + 60,
            **claims,
        }
        return jwt.encode(body, private, algorithm="RS256", headers={"kid": kid})

    try:
        async with ChatClient(target, metadata=bearer(rs256("key-1"))) as client:
            conversation = await client.conversation()
            assert kinds(await run_turn(conversation, "hi", "r1"))[-1] == "done"
        error = await _rejected(target, bearer(rs256("key-1", iss="https://evil.example")))
        assert error.reason == "TOKEN_ISSUER_REJECTED"
        # A flood of unknown key ids causes at most one refetch per interval.
        for i in range(5):
            error = await _rejected(target, bearer(rs256(f"unknown-{i}")))
            assert error.reason == "TOKEN_KEY_UNKNOWN"
        assert len(hits) == 1  # fetched once; the refetch interval (60 s) has not passed
        # HS256 tokens are not accepted when the server is configured for JWKS.
        error = await _rejected(target, bearer(hs256({"tenant": "acme"})))
        assert error.reason == "TOKEN_ALGORITHM_REJECTED"
    finally:
        await app.shutdown(grace=0)


async def test_jwks_cache_refetch_is_bounded(
    jwks_server: tuple[str, Any, list[float]],
) -> None:
    url, _, hits = jwks_server
    now = [1000.0]
    cache = JwksCache(url, refetch_interval=60.0, clock=lambda: now[0])
    assert await cache.get("key-1") is not None
    assert await cache.get("nope") is None
    now[0] += 59.9
    assert await cache.get("nope") is None  # an unknown kid refetches at most once a minute
    assert len(hits) == 1
    now[0] += 0.2
    assert await cache.get("nope") is None
    assert len(hits) == 2


@pytest.mark.slow
async def test_keys_cli_create_list_revoke(redis_proc: RedisProcess, redis_url: str) -> None:
    korero = str(Path(sys.executable).parent / "korero")
    env = {**os.environ, "REDIS_URL": redis_url}

    async def run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            korero,
            "keys",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        return int(proc.returncode or 0), out.decode(), err.decode()

    code, out, err = await run(
        "create", "--tenant", "acme", "--name", "bot", "--scope", "chat:write"
    )
    assert code == 0, err
    key = out.strip()
    assert key.startswith("kr_acme_")
    key_id = err.split("key id ")[1].split()[0]
    stored = redis_proc.client().hgetall("kr:{acme:auth}:apikeys")
    assert len(stored) == 1
    assert key.encode() not in b"".join(stored.values())  # only the hash is kept
    code, out, _ = await run("list", "--tenant", "acme")
    assert code == 0
    assert key_id in out
    assert "active" in out
    assert "chat:write" in out
    assert key not in out
    code, out, _ = await run("revoke", "--tenant", "acme", key_id)
    assert code == 0
    code, out, _ = await run("list", "--tenant", "acme")
    assert "revoked" in out
    code, _, err = await run("create", "--tenant", "Not A Tenant")
    assert code == 2
    assert "--tenant" in err

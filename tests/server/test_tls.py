"""TLS and mutual TLS: on the server's own listeners, in the CLI, and through
Envoy (TLS for browsers, mutual TLS to the instances) — with a CA and
certificates generated for the test (`korero.testing.LocalPKI`)."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from bench.fleet import Fleet
from korero.client import ChatClient, ChatError
from korero.server.app import KoreroServer
from korero.server.settings import Settings, TLSSettings
from korero.sim import UpstreamSim
from korero.testing import LocalPKI
from tests.conftest import make_settings
from tests.helpers import kinds, run_turn

KORERO = str(Path(sys.executable).parent / "korero")
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPKI:
    return LocalPKI.create(tmp_path_factory.mktemp("pki"))


def _with_tls(settings: Settings, tls: TLSSettings) -> Settings:
    return dataclasses.replace(settings, tls=tls)


@pytest.fixture
async def mtls_server(
    redis_url: str, sim: UpstreamSim, pki: LocalPKI
) -> AsyncIterator[KoreroServer]:
    settings = _with_tls(
        make_settings(redis_url, sim.base_url),
        TLSSettings(cert_file=pki.server.cert, key_file=pki.server.key, client_ca_file=pki.ca),
    )
    app = await KoreroServer.start(settings)
    yield app
    await app.shutdown(grace=0)


def _credentials(pki: LocalPKI, pair: str | None) -> grpc.ChannelCredentials:
    if pair is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    cert = getattr(pki, pair)
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=cert.key.read_bytes(),
        certificate_chain=cert.cert.read_bytes(),
    )


async def _refused(target: str, credentials: grpc.ChannelCredentials | None) -> ChatError:
    async with ChatClient(target, credentials=credentials) as client:
        with pytest.raises(ChatError) as refused:
            await asyncio.wait_for(client.conversation(), 10)
    return refused.value


async def test_mutual_tls_admits_the_cas_clients_and_refuses_the_rest(
    mtls_server: KoreroServer, pki: LocalPKI
) -> None:
    target = f"localhost:{mtls_server.port}"
    async with ChatClient(target, credentials=_credentials(pki, "client")) as client:
        conversation = await client.conversation()
        assert kinds(await run_turn(conversation, "Hello over mTLS", "m1"))[-1] == "done"
    # A certificate from another CA, no certificate at all, no TLS at all: refused
    # in the handshake, before any call reaches the server.
    for credentials in (_credentials(pki, "rogue"), _credentials(pki, None), None):
        error = await _refused(target, credentials)
        assert error.code == grpc.StatusCode.UNAVAILABLE, error


async def test_the_websocket_listener_serves_the_same_tls(
    mtls_server: KoreroServer, pki: LocalPKI
) -> None:
    assert mtls_server.websocket is not None
    url = f"https://localhost:{mtls_server.websocket.port}/healthz"
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    trusted.load_cert_chain(pki.client.cert, pki.client.key)
    async with aiohttp.ClientSession() as http, http.get(url, ssl=trusted) as response:
        assert response.status == 200
    rogue = ssl.create_default_context(cafile=str(pki.ca))
    rogue.load_cert_chain(pki.rogue.cert, pki.rogue.key)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(url, ssl=rogue) as response:
                await response.read()


async def test_tls_without_a_client_ca_serves_any_client_that_trusts_it(
    redis_url: str, sim: UpstreamSim, pki: LocalPKI
) -> None:
    settings = _with_tls(
        make_settings(redis_url, sim.base_url),
        TLSSettings(cert_file=pki.server.cert, key_file=pki.server.key),
    )
    app = await KoreroServer.start(settings)
    try:
        target = f"127.0.0.1:{app.port}"  # the certificate names 127.0.0.1 too
        async with ChatClient(target, credentials=_credentials(pki, None)) as client:
            conversation = await client.conversation()
            assert kinds(await run_turn(conversation, "Hello over TLS", "t1"))[-1] == "done"
        error = await _refused(target, None)  # plaintext to a TLS port
        assert error.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await app.shutdown(grace=0)


async def _run(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_korero_health_chat_and_grpcurl_take_the_tls_flags(
    mtls_server: KoreroServer, pki: LocalPKI
) -> None:
    target = f"localhost:{mtls_server.port}"
    mine = ["--ca", str(pki.ca), "--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    code, out, err = await _run(KORERO, "health", "--target", target, *mine)
    assert (code, out.strip()) == (0, f"{target}: SERVING"), err
    rogue = ["--ca", str(pki.ca), "--cert", str(pki.rogue.cert), "--key", str(pki.rogue.key)]
    code, _, err = await _run(KORERO, "health", "--target", target, "--timeout", "2", *rogue)
    assert code == 2
    assert "UNAVAILABLE" in err
    code, out, err = await _run(KORERO, "chat", "--target", target, *mine, stdin=b"hi\n")
    assert code == 0, err
    assert "[stop · " in out
    grpcurl_tls = [
        "-cacert",
        str(pki.ca),
        "-cert",
        str(pki.client.cert),
        "-key",
        str(pki.client.key),
    ]
    code, out, err = await _run(GRPCURL, *grpcurl_tls, target, "list")
    assert code == 0, err
    assert "korero.chat.v1.ChatService" in out


@pytest.mark.slow
async def test_envoy_terminates_tls_and_speaks_mutual_tls_to_the_instances(
    redis_url: str, sim: UpstreamSim, pki: LocalPKI, tmp_path: Path
) -> None:
    fleet = Fleet(
        tmp_path,
        count=1,
        pki=pki,
        env={"REDIS_URL": redis_url, "KORERO_LLM_BASE_URL": sim.base_url},
    )
    try:
        await fleet.start()  # Envoy's health checks already passed over mTLS
        envoy = f"localhost:{fleet.port}"
        # Native gRPC through Envoy's TLS listener (the browser-facing one).
        async with ChatClient(envoy, credentials=_credentials(pki, None)) as client:
            conversation = await client.conversation()
            assert kinds(await run_turn(conversation, "Hello through Envoy", "e1"))[-1] == "done"
        # The page and the WebSocket listener, over HTTPS through Envoy.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"https://localhost:{fleet.port}/healthz", ssl=fleet.client_ssl()) as page,
        ):
            assert page.status == 200
        code, out, err = await _run(GRPCURL, "-cacert", str(pki.ca), envoy, "list")
        assert code == 0, err
        assert "grpc.health.v1.Health" in out
        # Plaintext to Envoy's TLS listener is refused; Envoy was the only client of the
        # instance that holds a certificate, so a direct plaintext call is refused too.
        assert (await _refused(envoy, None)).code == grpc.StatusCode.UNAVAILABLE
        direct = fleet.instances[0].grpc
        assert (await _refused(direct, _credentials(pki, None))).code == grpc.StatusCode.UNAVAILABLE
    finally:
        await fleet.stop()

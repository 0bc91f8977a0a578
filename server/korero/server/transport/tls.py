"""TLS and mutual TLS for the listeners, from `TLSSettings`.

The gRPC listener uses grpcio's own TLS (`grpc.ssl_server_credentials`);
the WebSocket/page listener an `ssl.SSLContext` for aiohttp. With a client
CA configured, both refuse, during the handshake, any client that does not
present a certificate signed by it — in production, only the Envoy in front
holds one. Files are read once at start; rotate by restarting instances one
at a time (each drains first).
"""

from __future__ import annotations

import ssl

import grpc

from korero.server.settings import TLSSettings

__all__ = ["describe", "grpc_server_credentials", "server_ssl_context"]


def describe(settings: TLSSettings) -> str:
    """`off`, `tls` or `mtls`, for logs."""
    if not settings.enabled:
        return "off"
    return "mtls" if settings.client_ca_file is not None else "tls"


def grpc_server_credentials(settings: TLSSettings) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`; None when TLS is off."""
    if settings.cert_file is None or settings.key_file is None:
        return None
    pair = (settings.key_file.read_bytes(), settings.cert_file.read_bytes())
    client_ca = (
        settings.client_ca_file.read_bytes() if settings.client_ca_file is not None else None
    )
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def server_ssl_context(settings: TLSSettings) -> ssl.SSLContext | None:
    """An SSL context for the aiohttp listener; None when TLS is off."""
    if settings.cert_file is None or settings.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert_file, settings.key_file)
    if settings.client_ca_file is not None:
        context.load_verify_locations(cafile=settings.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context

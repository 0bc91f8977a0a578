"""A throwaway certificate authority and certificates, for TLS tests and local runs.

    pki = LocalPKI.create(directory)
    pki.server.cert, pki.server.key      # for KORERO_TLS_CERT / KORERO_TLS_KEY
    pki.ca                               # for KORERO_TLS_CLIENT_CA and clients' --ca
    pki.client.cert, pki.client.key      # a client (e.g. Envoy) the CA signed
    pki.rogue.cert, pki.rogue.key        # a client signed by another CA: refused

Keys are EC P-256, certificates valid for a day, the server's for
`localhost`, `korero` and 127.0.0.1. Generated with `cryptography`; never
use them for anything but tests.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertPair", "LocalPKI"]

SERVER_NAMES = ("localhost", "korero")


@dataclass(frozen=True)
class CertPair:
    """PEM files of one certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class LocalPKI:
    """A CA, a server certificate, a client certificate and a rogue client's."""

    ca: Path
    server: CertPair
    client: CertPair
    rogue: CertPair
    rogue_ca: Path

    @classmethod
    def create(cls, directory: Path) -> LocalPKI:
        directory.mkdir(parents=True, exist_ok=True)
        ca_key, ca_cert = _authority("Korero Test CA")
        rogue_key, rogue_ca_cert = _authority("Someone Else's CA")
        ca = _write_cert(directory / "ca.pem", ca_cert)
        rogue_ca = _write_cert(directory / "rogue-ca.pem", rogue_ca_cert)
        server = _issue(directory, "server", ca_key, ca_cert, server=True)
        client = _issue(directory, "client", ca_key, ca_cert, server=False)
        rogue = _issue(directory, "rogue", rogue_key, rogue_ca_cert, server=False)
        return cls(ca, server, client, rogue, rogue_ca)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(
        now + dt.timedelta(days=1)
    )


def _authority(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, _validity(builder).sign(key, hashes.SHA256())


def _issue(
    directory: Path,
    stem: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server: bool,
) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES] + [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    ]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("korero" if server else f"korero-{stem}"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = _validity(builder).sign(ca_key, hashes.SHA256())
    key_path = directory / f"{stem}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return CertPair(_write_cert(directory / f"{stem}.pem", cert), key_path)


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path

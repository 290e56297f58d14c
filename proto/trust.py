"""The trust contract both ends share: token text, roles, CA pinning and secure channels."""

from __future__ import annotations

import enum
import hashlib
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# gRPC metadata carrying a token: `authorization: Bearer <token>`.
AUTHORIZATION_KEY = "authorization"
# A token is `pa1_<sha256 of the CA certificate (DER), hex>_<id>_<secret>`; the CA part is
# `x` when the coordinator's CA is not known to it (an operator's PKI without its root).
_TOKEN = re.compile(r"^pa1_(?P<ca>[0-9a-f]{64}|x)_(?P<id>[0-9a-f]{12})_(?P<secret>[0-9a-f]{64})$")
# Agent and build names: what may appear in logs, terminals and certificate subjects.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class Role(enum.Enum):
    """What a token may do. read ⊂ ci ⊂ admin; agent is the enrolment role only."""

    READ = "read"
    CI = "ci"
    ADMIN = "admin"
    AGENT = "agent"

    def allows(self, required: Role) -> bool:
        """True when a token of this role may call an RPC that requires `required`."""
        if required is Role.AGENT:
            return self in (Role.AGENT, Role.ADMIN)
        if self is Role.AGENT:
            return False
        order = (Role.READ, Role.CI, Role.ADMIN)
        return order.index(self) >= order.index(required)


class TokenFormatError(ValueError):
    """A token that is not `pa1_<ca>_<id>_<secret>`; the message never repeats the token."""


@dataclass(frozen=True)
class TokenText:
    """A parsed token: which stored token it names, its secret, and the CA it pins."""

    token_id: str
    secret: str
    ca_sha256: str | None

    def __str__(self) -> str:
        return f"pa1_{self.ca_sha256 or 'x'}_{self.token_id}_{self.secret}"

    def __repr__(self) -> str:  # never print the secret
        return f"TokenText(token_id={self.token_id!r}, ca_sha256={self.ca_sha256!r})"


def parse_token(text: str) -> TokenText:
    match = _TOKEN.match(text.strip())
    if match is None:
        raise TokenFormatError(
            "malformed token: expected pa1_<ca-sha256>_<id>_<secret> as printed by "
            "`polyarch token create` (check for a truncated copy)"
        )
    ca = match["ca"]
    return TokenText(match["id"], match["secret"], None if ca == "x" else ca)


def secret_digest(secret: str) -> str:
    """What the coordinator stores of a token: the secret's sha256 (256 random bits in it)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def certificate_sha256(pem: bytes) -> str:
    """sha256 (hex) of a PEM certificate's DER form: the pin a token carries."""
    # imported here: every client imports this module, few compute a pin (30 ms saved)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def write_private(path: Path, data: bytes) -> None:
    """Writes a key or token file 0600 from the start (never world-readable for a moment),
    atomically: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(partial, 0o600)
    os.replace(partial, path)


class PinMismatch(Exception):
    """The server's chain holds no certificate with the pinned hash: not our coordinator."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def fetch_pinned_ca(address: str, ca_sha256: str, timeout: float = 10.0) -> bytes:
    """The coordinator's CA certificate (PEM), taken from its TLS chain and checked against
    the pin, as k3s does with the hash in its join token. The handshake is unverified on
    purpose: nothing is sent over it, and only a chain holding the pinned CA is accepted;
    gRPC then verifies the server against that CA as usual."""
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host or None) as tls,
    ):
        chain = _unverified_chain(tls)
    for der in chain:
        if hashlib.sha256(der).hexdigest() == ca_sha256:
            return ssl.DER_cert_to_PEM_cert(der).encode()
    raise PinMismatch(
        f"the server at {address} does not present the CA pinned by the token "
        f"(sha256 {ca_sha256[:16]}...): wrong address, or someone in between"
    )


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    # Python 3.13 made it public; 3.10-3.12 have it on the C object.
    public = getattr(tls, "get_unverified_chain", None)
    if public is not None:
        return [_der(cert) for cert in public()]
    sslobj: Any = getattr(tls, "_sslobj", None)
    if sslobj is None or not hasattr(sslobj, "get_unverified_chain"):
        raise PinMismatch("this Python cannot read a TLS chain; pass --ca-file instead")
    return [_der(cert) for cert in sslobj.get_unverified_chain()]


def _der(cert: Any) -> bytes:
    if isinstance(cert, bytes):
        return cert
    public_bytes = getattr(cert, "public_bytes", None)
    if public_bytes is not None:  # 3.13: ssl.Certificate
        return bytes(public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
    return bytes(cert.public_bytes(1))  # _ssl.Certificate, 1 == DER


@dataclass(frozen=True)
class ClientTrust:
    """How a client reaches a coordinator: plaintext (insecure) or TLS with roots and a token.

    root_pem None means the system's roots. server_name overrides the name checked in the
    server's certificate (when dialling an address its certificate does not list).
    """

    insecure: bool = False
    root_pem: bytes | None = None
    token: str | None = None
    client_key_pem: bytes | None = None
    client_cert_pem: bytes | None = None
    server_name: str | None = None

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials, None for plaintext. A token rides on every call."""
        if self.insecure:
            return None
        channel = grpc.ssl_channel_credentials(
            root_certificates=self.root_pem,
            private_key=self.client_key_pem,
            certificate_chain=self.client_cert_pem,
        )
        if self.token is None:
            return channel
        return grpc.composite_channel_credentials(
            channel, grpc.access_token_call_credentials(self.token)
        )


def aio_channel(
    address: str, trust: ClientTrust, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to the coordinator under `trust`."""
    all_options = [*(options or []), *trust.channel_options()]
    credentials = trust.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=all_options)
    return grpc.aio.secure_channel(address, credentials, options=all_options)

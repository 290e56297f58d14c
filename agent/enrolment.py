"""Enrol once with a token, then connect with the certificate: the agent's identity on disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from polyarch.proto.trust import ClientTrust, aio_channel, split_address, write_private
from polyarch.proto.v1 import trust_pb2, trust_pb2_grpc


class EnrolmentError(Exception):
    """Enrolment was refused or cannot happen; the message says why and what to do."""


@dataclass(frozen=True)
class Identity:
    """An enrolled agent: its key, certificate, the CA, and where the agent channel is."""

    name: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    agent_address: str  # HOST:PORT of the coordinator's mTLS agent port

    def trust(self, server_name: str | None = None) -> ClientTrust:
        return ClientTrust(
            root_pem=self.ca_pem, client_key_pem=self.key_pem, client_cert_pem=self.cert_pem,
            server_name=server_name,
        )  # fmt: skip


class IdentityStore:
    """S/key.pem (0600), S/cert.pem, S/ca.pem and S/enrolment.json, in a 0700 folder."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    def load(self, name: str, coordinator: str) -> Identity | None:
        """The stored identity for this name and coordinator, or None to enrol."""
        meta_path = self.dir / "enrolment.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("name") != name or meta.get("coordinator") != coordinator:
            return None
        return Identity(
            name, (self.dir / "key.pem").read_bytes(), (self.dir / "cert.pem").read_bytes(),
            (self.dir / "ca.pem").read_bytes(), meta["agent_address"],
        )  # fmt: skip

    def save(self, identity: Identity, coordinator: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        write_private(self.dir / "key.pem", identity.key_pem)
        write_private(self.dir / "cert.pem", identity.cert_pem)
        write_private(self.dir / "ca.pem", identity.ca_pem)
        meta = {"name": identity.name, "coordinator": coordinator,
                "agent_address": identity.agent_address}  # fmt: skip
        write_private(self.dir / "enrolment.json", json.dumps(meta, indent=2).encode())


def new_csr(name: str) -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM) for a fresh EC P-256 key; the key never leaves the agent."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


async def enrol(
    coordinator: str, trust: ClientTrust, name: str, replace: bool, timeout: float = 30.0
) -> Identity:
    """Asks the coordinator (over TLS, with an agent or admin token) for a certificate."""
    key_pem, csr_pem = new_csr(name)
    async with aio_channel(coordinator, trust) as channel:
        stub = trust_pb2_grpc.TrustServiceStub(channel)
        request = trust_pb2.EnrollRequest(name=name, csr_pem=csr_pem, replace=replace)
        try:
            response = await stub.Enroll(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.ALREADY_EXISTS:
                raise EnrolmentError(f"{exc.details()}") from None
            raise EnrolmentError(
                f"enrolment of agent {name} at {coordinator} failed: {code.name}: {exc.details()}"
            ) from None
    host, _ = split_address(coordinator)
    host = f"[{host}]" if ":" in host else host
    return Identity(
        name, key_pem, response.certificate_pem, response.ca_pem, f"{host}:{response.agent_port}"
    )

"""Enrol once with a token, then connect with the certificate: the agent's identity on disk."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from polyarch.agent.config import AgentConfig
from polyarch.agent.coordinators import agent_addresses, split_addresses
from polyarch.client.credentials import Credentials
from polyarch.proto.active_coordinator import MAX_REDIRECTS, standby_named
from polyarch.proto.trust import ClientTrust, aio_channel, split_address, write_private
from polyarch.proto.v1 import trust_pb2, trust_pb2_grpc

log = logging.getLogger(__name__)


class EnrolmentError(Exception):
    """Enrolment was refused or cannot happen; the message says why and what to do.
    `unanswered`: that coordinator did not serve the request (another one may); `active`:
    the active coordinator a standby's refusal named."""

    def __init__(self, message: str, unanswered: bool = False, active: str = "") -> None:
        super().__init__(message)
        self.unanswered, self.active = unanswered, active


@dataclass(frozen=True)
class Identity:
    """An enrolled agent: its key, certificate, the CA, and where the agent channel is."""

    name: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    agent_address: str  # HOST:PORT of the coordinator's mTLS agent port

    @property
    def agent_port(self) -> int:
        """The agent port enrolment reported: every coordinator of the farm uses it."""
        return split_address(self.agent_address)[1]

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
        """The stored identity for this name and coordinator(s) (the same addresses, in any
        order, as at enrolment), or None to enrol."""
        meta_path = self.dir / "enrolment.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("name") != name or not same_addresses(meta.get("coordinator"), coordinator):
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


def same_addresses(stored: object, given: str) -> bool:
    """True when the stored coordinator key names the same set of addresses as `given`."""
    try:
        return isinstance(stored, str) and set(split_addresses(stored)) == set(
            split_addresses(given)
        )
    except ValueError:  # an unreadable key: enrol again
        return False


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
                f"enrolment of agent {name} at {coordinator} failed: {code.name}: {exc.details()}",
                unanswered=code == grpc.StatusCode.UNAVAILABLE,
                active=standby_named(exc),
            ) from None
    host, _ = split_address(coordinator)
    host = f"[{host}]" if ":" in host else host
    return Identity(
        name, key_pem, response.certificate_pem, response.ca_pem, f"{host}:{response.agent_port}"
    )


async def enrol_first(
    coordinators: list[str], credentials: Credentials, name: str, replace: bool
) -> Identity:
    """Enrols at the first coordinator that serves the request, in order; a standby's
    refusal sends it to the active coordinator it names (a few times in a row at most)."""
    pending, redirects, failures = list(coordinators), 0, []
    while pending:
        address = pending.pop(0)
        try:
            # with a token's CA pin this dials `address`: the CA comes from its TLS chain
            trust = await asyncio.to_thread(credentials.resolve, address)
            return await enrol(address, trust, name, replace)
        except OSError as exc:
            failures.append(f"cannot reach {address} ({exc.strerror or exc})")
        except EnrolmentError as exc:
            if not exc.unanswered:
                raise
            if exc.active and redirects < MAX_REDIRECTS:
                redirects += 1
                log.info("%s is a standby: enrolling at the active one, %s", address, exc.active)
                pending.insert(0, exc.active)
            else:
                failures.append(str(exc))
    raise EnrolmentError(f"agent {name} could not enrol: {'; '.join(failures)}")


class IdentityRefusedAtStart(Exception):
    """No identity and no way to get one."""


async def channel_trust(
    config: AgentConfig, credentials: Credentials, replace: bool
) -> tuple[ClientTrust, str]:
    """(trust, addresses) of the agent channel, the addresses comma-separated in the order
    of the coordinators: plaintext to a --insecure coordinator, or mTLS under the identity in
    the state dir, enrolling first (with a token) when there is none."""
    if credentials.insecure:
        return ClientTrust(insecure=True), config.coordinator
    if config.tls_cert is not None:
        return operator_identity(config, credentials.ca_pem, credentials.server_name)
    coordinators = split_addresses(config.coordinator)
    store = IdentityStore(config.state_dir or config.workspace_dir() / "state")
    identity = None if replace else store.load(config.name, config.coordinator)
    if identity is None:
        if credentials.token is None:
            raise IdentityRefusedAtStart(
                f"agent {config.name} is not enrolled with {config.coordinator} (state in "
                f"{store.dir}): pass an agent token (--token, --token-file or $POLYARCH_TOKEN)"
            )
        identity = await enrol_first(coordinators, credentials, config.name, replace)
        store.save(identity, config.coordinator)
        log.info("enrolled as %s; identity saved in %s", config.name, store.dir)
    # one identity for all of them: the coordinators share the CA (through the database)
    addresses = agent_addresses(coordinators, _explicit(config), identity.agent_port)
    return identity.trust(credentials.server_name), ",".join(addresses)


def _explicit(config: AgentConfig) -> list[str]:
    return split_addresses(config.agent_channel, "agent_channel") if config.agent_channel else []


def operator_identity(
    config: AgentConfig, ca_pem: bytes | None, server_name: str | None
) -> tuple[ClientTrust, str]:
    """A client certificate from the operator's PKI (tls_cert/tls_key, --ca-file): no
    enrolment; the certificate's name must be the agent's name."""
    if config.tls_cert is None or config.tls_key is None or ca_pem is None:
        raise IdentityRefusedAtStart("--tls-cert needs --tls-key and --ca-file")
    cert_pem = config.tls_cert.read_bytes()
    names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME
    )
    if not names or names[0].value != config.name:
        raise IdentityRefusedAtStart(f"{config.tls_cert} is not a certificate for {config.name}")
    addresses = agent_addresses(split_addresses(config.coordinator), _explicit(config))
    trust = ClientTrust(
        root_pem=ca_pem, client_key_pem=config.tls_key.read_bytes(),
        client_cert_pem=cert_pem, server_name=server_name,
    )  # fmt: skip
    return trust, ",".join(addresses)

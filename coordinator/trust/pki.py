"""The coordinator's own PKI: a CA made on first start, its server certificate, agent certs."""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from polyarch.proto.trust import NAME_PATTERN, certificate_sha256, write_private

CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=825)
AGENT_VALIDITY = datetime.timedelta(days=825)
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


class CertificateRequestError(ValueError):
    """A CSR that cannot be signed: the message says why."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def host_of(address: str) -> str:
    """The host of HOST, HOST:PORT, [V6]:PORT or a bare IPv6 address."""
    if address.startswith("["):
        return address[1 : address.index("]")]
    if address.count(":") > 1:
        return address  # a bare IPv6 address
    return address.rpartition(":")[0] if ":" in address else address


def server_names(listen: list[str], advertise: list[str]) -> list[str]:
    """The names and addresses a server certificate lists: loopback, this host, the listen
    hosts (unless wildcards) and every advertised host."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    for address in [*listen, *advertise]:
        host = host_of(address)
        if host not in _WILDCARDS and host not in names:
            names.append(host)
    return names


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


@dataclass(frozen=True)
class ServerTLS:
    """What the gRPC server presents and trusts."""

    server_cert_pem: bytes  # leaf, then the CA when we made it
    server_key_pem: bytes
    client_ca_pem: bytes  # agents' certificates must chain to this
    ca_sha256: str | None  # the pin tokens carry; None when unknown (operator PKI)


@dataclass(frozen=True)
class CAMaterial:
    """A CA certificate and its private key, PEM. The key is a secret: never log this."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @property
    def sha256(self) -> str:
        return certificate_sha256(self.cert_pem)


def new_ca() -> CAMaterial:
    """A new self-signed CA (EC P-256, 10 years), in memory."""
    key = new_key()
    # a unique name: two farms' CAs never look alike to a verifier or to an operator
    label = f"polyarch coordinator CA {secrets.token_hex(4)}"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return CAMaterial(cert_pem(cert), key_pem(key))


class CertificateAuthority:
    """D/tls/: ca.pem + ca-key.pem (made once), server.pem + server-key.pem (remade when the
    names change). Signs agents' CSRs with their name as the only subject.

    With `shared` (the CA coordinators share through their database) the CA comes from
    memory: D/tls/ keeps this coordinator's server certificate and key, a ca.pem only where
    it had none (for operators), and never the CA's key."""

    def __init__(self, tls_dir: Path, shared: CAMaterial | None = None) -> None:
        self.tls_dir = tls_dir
        self.ca_path = tls_dir / "ca.pem"
        self.ca_key_path = tls_dir / "ca-key.pem"
        self.server_path = tls_dir / "server.pem"
        self.server_key_path = tls_dir / "server-key.pem"
        self.shared = shared

    def ensure(self, names: list[str]) -> ServerTLS:
        """Creates the CA if missing (own CA) and a server certificate covering `names`."""
        self.tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.tls_dir, 0o700)
        if self.shared is not None:
            if not self.ca_path.exists():
                self.ca_path.write_bytes(self.shared.cert_pem)
        elif not self.ca_path.exists() or not self.ca_key_path.exists():
            self._create_ca()
        if not self._server_covers(names):
            self._create_server(names)
        ca_pem = self.ca_pem()
        return ServerTLS(
            server_cert_pem=self.server_path.read_bytes() + ca_pem,
            server_key_pem=self.server_key_path.read_bytes(),
            client_ca_pem=ca_pem,
            ca_sha256=certificate_sha256(ca_pem),
        )

    def ca_pem(self) -> bytes:
        """The CA certificate agents and clients trust."""
        return self.shared.cert_pem if self.shared is not None else self.ca_path.read_bytes()

    def own_material(self) -> CAMaterial | None:
        """The data dir's own CA (certificate and key), if it has one."""
        if not self.ca_path.exists() or not self.ca_key_path.exists():
            return None
        return CAMaterial(self.ca_path.read_bytes(), self.ca_key_path.read_bytes())

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        material = self.shared or CAMaterial(
            self.ca_path.read_bytes(), self.ca_key_path.read_bytes()
        )
        cert = x509.load_pem_x509_certificate(material.cert_pem)
        key = serialization.load_pem_private_key(material.key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def _create_ca(self) -> None:
        material = new_ca()
        write_private(self.ca_key_path, material.key_pem)
        self.ca_path.write_bytes(material.cert_pem)
        # a new CA invalidates the old server certificate
        self.server_path.unlink(missing_ok=True)

    def _server_covers(self, names: list[str]) -> bool:
        if not self.server_path.exists() or not self.server_key_path.exists():
            return False
        cert = x509.load_pem_x509_certificate(self.server_path.read_bytes())
        ca_cert, _ = self._ca()
        if cert.issuer != ca_cert.subject:
            return False
        if cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < datetime.timedelta(
            days=30
        ):
            return False
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        listed = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
        listed |= set(san.get_values_for_type(x509.DNSName))
        return all(
            str(ipaddress.ip_address(n)) in listed if _is_ip(n) else n in listed for n in names
        )

    def _create_server(self, names: list[str]) -> None:
        ca_cert, ca_key = self._ca()
        key = new_key()
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + SERVER_VALIDITY)
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(ca_key, hashes.SHA256())
        )
        write_private(self.server_key_path, key_pem(key))
        self.server_path.write_bytes(cert_pem(cert))

    def sign_agent(self, name: str, csr_pem: bytes) -> x509.Certificate:
        """A client certificate for agent `name` from its CSR (the CSR's subject is ignored:
        the name the coordinator enrolled is the only identity the certificate carries)."""
        if not NAME_PATTERN.match(name):
            raise CertificateRequestError(f"invalid agent name {name!r}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CertificateRequestError(f"unreadable certificate request: {exc}") from None
        if not csr.is_signature_valid:
            raise CertificateRequestError("the certificate request's signature is invalid")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.key_size < 256:
            raise CertificateRequestError("agent keys must be EC P-256 or stronger")
        ca_cert, ca_key = self._ca()
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + AGENT_VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256())
        )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def operator_tls(cert_file: Path, key_file: Path, client_ca_file: Path) -> ServerTLS:
    """An operator's own PKI: the server chain, its key, and the CA agents' certs chain to.
    Tokens pin the chain's last certificate when it is self-signed (a root), else nothing."""
    chain_pem = cert_file.read_bytes()
    certs = x509.load_pem_x509_certificates(chain_pem)
    root = certs[-1]
    pin = certificate_sha256(cert_pem(root)) if root.issuer == root.subject else None
    return ServerTLS(chain_pem, key_file.read_bytes(), client_ca_file.read_bytes(), pin)

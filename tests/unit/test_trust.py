"""Trust without a network: roles, token text, the token book, the access table, the CA."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from polyarch.agent.enrolment import new_csr
from polyarch.coordinator.core.model import Unauthenticated
from polyarch.coordinator.core.states import JobOutcome, describe_malformed
from polyarch.coordinator.trust.auth import METHOD_ACCESS, Access, TokenBook
from polyarch.coordinator.trust.pki import (
    CertificateAuthority,
    CertificateRequestError,
    server_names,
)
from polyarch.coordinator.trust.store import MemoryTrustStore
from polyarch.proto.trust import Role, TokenFormatError, certificate_sha256, parse_token
from polyarch.proto.v1 import agent_pb2, build_pb2, fleet_pb2, trust_pb2


@pytest.mark.parametrize(
    ("holder", "required", "allowed"),
    [
        (Role.READ, Role.READ, True), (Role.READ, Role.CI, False), (Role.READ, Role.ADMIN, False),
        (Role.CI, Role.READ, True), (Role.CI, Role.CI, True), (Role.CI, Role.ADMIN, False),
        (Role.ADMIN, Role.READ, True), (Role.ADMIN, Role.ADMIN, True),
        (Role.ADMIN, Role.AGENT, True), (Role.AGENT, Role.AGENT, True),
        (Role.AGENT, Role.READ, False), (Role.CI, Role.AGENT, False),
    ],
)  # fmt: skip
def test_roles_nest(holder: Role, required: Role, allowed: bool) -> None:
    assert holder.allows(required) is allowed


def test_token_text_round_trips_and_never_prints_its_secret() -> None:
    text = "pa1_" + "a" * 64 + "_0123456789ab_" + "f" * 64
    token = parse_token(text)
    assert (token.token_id, token.ca_sha256, str(token)) == ("0123456789ab", "a" * 64, text)
    assert "f" * 64 not in repr(token)
    assert parse_token("pa1_x_0123456789ab_" + "f" * 64).ca_sha256 is None
    for bad in ("", "pa1_abc", text[:-1], text.replace("pa1", "pa2"), text + "0"):
        with pytest.raises(TokenFormatError, match="malformed token") as caught:
            parse_token(bad)
        assert bad[4:] not in str(caught.value) or not bad[4:]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_token_book_keeps_hashes_and_refuses_revoked_and_expired_tokens() -> None:
    store, clock = MemoryTrustStore(), Clock()
    book = TokenBook(store, "c" * 64, clock)
    text = book.create(Role.CI, ttl=60, description="ci")
    assert str(text).startswith("pa1_" + "c" * 64 + "_")
    record = store.get_token(text.token_id)
    assert record is not None and text.secret not in repr(record.__dict__)
    principal = book.authenticate(str(text))
    assert (principal.role, principal.token_id) == (Role.CI, text.token_id)

    wrong = str(text)[:-1] + ("0" if str(text)[-1] != "0" else "1")
    with pytest.raises(Unauthenticated, match="unknown token"):
        book.authenticate(wrong)
    clock.now += 61
    with pytest.raises(Unauthenticated, match="expired"):
        book.authenticate(str(text))

    forever = book.create(Role.READ)
    held = book.authenticate(str(forever))
    assert book.invalid_now(held) == ""
    book.revoke(forever.token_id)
    assert "revoked" in book.invalid_now(held)  # an open upload stream stops at its next chunk
    with pytest.raises(Unauthenticated, match="revoked"):
        book.authenticate(str(forever))
    with pytest.raises(Unauthenticated, match="malformed"):
        book.authenticate("Bearer nonsense")


def test_the_admin_token_file_is_written_once_and_private(tmp_path: Path) -> None:
    book = TokenBook(MemoryTrustStore(), None)
    path = tmp_path / "data" / "admin.token"
    assert book.ensure_admin_token(path)
    first = path.read_text()
    assert not book.ensure_admin_token(path)
    assert path.read_text() == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert book.authenticate(first.strip()).role is Role.ADMIN


def test_every_rpc_has_an_access_rule_and_only_health_is_public() -> None:
    served = {
        f"/{service.full_name}/{method.name}"
        for module in (build_pb2, agent_pb2, fleet_pb2, trust_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served <= set(METHOD_ACCESS), sorted(served - set(METHOD_ACCESS))
    public = {m for m, need in METHOD_ACCESS.items() if need is Access.PUBLIC}
    assert public and all(m.startswith("/grpc.health.v1.Health/") for m in public)
    assert METHOD_ACCESS["/polyarch.v1.AgentService/FetchContext"] is Access.AGENT_CERT
    assert METHOD_ACCESS["/polyarch.v1.FleetService/DrainAgent"] is Role.ADMIN


def test_the_ca_signs_agents_under_the_enrolled_name_only(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path / "tls")
    tls = authority.ensure(server_names(["10.1.2.3:7600"], ["farm.example"]))
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700
    assert authority.ca_key_path.stat().st_mode & 0o777 == 0o600
    assert tls.ca_sha256 == certificate_sha256(authority.ca_path.read_bytes())
    server = x509.load_pem_x509_certificate(authority.server_path.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)
    assert "farm.example" in san.get_values_for_type(x509.DNSName)

    _, csr = new_csr("someone-else")  # the CSR's subject is ignored
    cert = authority.sign_agent("arm-1", csr)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "arm-1"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(CertificateRequestError, match="invalid agent name"):
        authority.sign_agent("bad\x1b[31mname", csr)
    with pytest.raises(CertificateRequestError, match="unreadable"):
        authority.sign_agent("arm-1", b"not a csr")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    rsa_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(weak, hashes.SHA256())
    )
    with pytest.raises(CertificateRequestError, match="EC P-256"):
        authority.sign_agent("arm-1", rsa_csr.public_bytes(Encoding.PEM))
    # a second start keeps the CA and the server certificate
    again = CertificateAuthority(tmp_path / "tls").ensure(server_names(["10.1.2.3:7600"], []))
    assert again.ca_sha256 == tls.ca_sha256
    assert server.not_valid_after_utc > datetime.datetime.now(datetime.UTC)


def test_malformed_results_are_named() -> None:
    good = JobOutcome(
        ok=True, digest="sha256:" + "0" * 64, size=10,
        media_type="application/vnd.oci.image.manifest.v1+json",
    )  # fmt: skip
    assert describe_malformed(good) == ""
    for change, says in [
        ({"digest": "sha256:abc"}, "malformed digest"),
        ({"digest": "md5:" + "0" * 64}, "malformed digest"),
        ({"size": -1}, "size of -1"),
        ({"media_type": "application/vnd.oci.image.index.v1+json"}, "unknown manifest media"),
    ]:
        assert says in describe_malformed(dataclasses.replace(good, **change))  # type: ignore[arg-type]

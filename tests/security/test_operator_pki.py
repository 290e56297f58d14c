"""An operator's own PKI: the coordinator presents their server cert, agents their client
certs (no enrolment), and tokens still pin the operator's root."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from polyarch.agent.enrolment import new_csr
from polyarch.proto.trust import ClientTrust, Role, aio_channel
from polyarch.proto.v1 import trust_pb2, trust_pb2_grpc
from tests.support.farm import POLYARCH
from tests.support.poll import wait_until
from tests.support.secure_farm import SecureCoordinator, healthy, running_secure_coordinator
from tests.support.services import docker_binary, stop_process

pytestmark = pytest.mark.security
NOW = datetime.datetime.now(datetime.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def issue(
    name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *,
    ca: bool = False, server: bool = False, client: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
        )
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("operator-pki")
    root = issue("Acme Root CA", None, ca=True)
    server = issue("farm.acme", root, server=True)
    agent = issue("op-agent", root, client=True)
    rogue_root = issue("Acme Root CA", None, ca=True)  # same name, another key
    rogue = issue("op-agent", rogue_root, client=True)
    files = {
        "root": _pem(root[0]), "chain": _pem(server[0]) + _pem(root[0]),
        "server-key": _key_pem(server[1]), "agent": _pem(agent[0]),
        "agent-key": _key_pem(agent[1]), "rogue": _pem(rogue[0]), "rogue-key": _key_pem(rogue[1]),
    }  # fmt: skip
    paths = {}
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
        paths[name] = folder / f"{name}.pem"
    return paths


@pytest.fixture(scope="module")
def coordinator(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]
) -> Iterator[SecureCoordinator]:
    with running_secure_coordinator(
        tmp_path_factory.mktemp("operator"), "--tls-cert", str(pki["chain"]),
        "--tls-key", str(pki["server-key"]), "--tls-client-ca", str(pki["root"]),
    ) as running:  # fmt: skip
        yield running


def agent_process(
    coordinator: SecureCoordinator, pki: dict[str, Path], cert: str, work: Path
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    for name in ("POLYARCH_TOKEN", "POLYARCH_TOKEN_FILE"):
        env.pop(name, None)
    with (work / f"agent-{cert}.log").open("wb") as log:
        return subprocess.Popen(
            [POLYARCH, "agent", "--coordinator", coordinator.address, "--name", "op-agent",
             "--builder", "docker", "--docker-binary", docker_binary(), "--native",
             "linux/amd64", "--emulated", "none", "--work-dir", str(work / cert),
             "--tls-cert", str(pki[cert]), "--tls-key", str(pki[f"{cert}-key"]),
             "--ca-file", str(pki["root"]), "--agent-channel", coordinator.agent_address],
            stdout=log, stderr=log, env=env,
        )  # fmt: skip


async def test_tokens_pin_the_operators_root_and_agents_need_no_enrolment(
    coordinator: SecureCoordinator, pki: dict[str, Path], tmp_path: Path
) -> None:
    # the admin token carries the operator root's hash: pinning works with their PKI too
    assert coordinator.admin_token.split("_")[1] != "x"
    listed = coordinator.cli("agents", "--json")
    assert listed.returncode == 0, listed.stderr
    # enrolment is refused: the operator issues agent certificates
    trust = ClientTrust(
        root_pem=pki["root"].read_bytes(), token=await coordinator.token(Role.AGENT)
    )
    async with aio_channel(coordinator.address, trust) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await trust_pb2_grpc.TrustServiceStub(channel).Enroll(
                trust_pb2.EnrollRequest(name="x", csr_pem=new_csr("x")[1])
            )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator's PKI" in (caught.value.details() or "")

    agent = agent_process(coordinator, pki, "agent", tmp_path)
    rogue = agent_process(coordinator, pki, "rogue", tmp_path)
    try:

        def ready() -> bool:
            done = coordinator.cli("agents", "--json")
            return any(a["name"] == "op-agent" for a in json.loads(done.stdout or "[]"))

        wait_until(ready, timeout=30, message="the operator-certified agent connected")
        # a certificate from another CA with the same names never gets a session
        wait_until(lambda: "UNAVAILABLE" in (tmp_path / "agent-rogue.log").read_text(),
                   timeout=30, message="the rogue agent was refused")  # fmt: skip
        agents = json.loads(coordinator.cli("agents", "--json").stdout)
        assert [a["name"] for a in agents] == ["op-agent"]  # the genuine one, once
    finally:
        stop_process(agent)
        stop_process(rogue)
    assert healthy(coordinator)

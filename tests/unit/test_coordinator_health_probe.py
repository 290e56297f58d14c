"""deploy/kubernetes/probes/coordinator_health.py --service: run as the kubelet would, against
a TLS gRPC server carrying the coordinator's own health service, once as a standby (the
process SERVING, the polyarch services NOT_SERVING) and once as the active coordinator."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from polyarch.coordinator.server import add_health_and_reflection, set_serving
from polyarch.coordinator.trust.pki import CertificateAuthority

PROBE = Path(__file__).resolve().parents[2] / "deploy/kubernetes/probes/coordinator_health.py"
BUILD_SERVICE = "polyarch.v1.BuildService"


class HealthServer:
    """A TLS server with the coordinator's health servicer; `serving` as set_serving left it."""

    def __init__(self, server: grpc.aio.Server, health: Any, port: int, ca: Path) -> None:
        self.server, self.health, self.ca = server, health, ca
        self.address = f"127.0.0.1:{port}"


@pytest.fixture
async def health_server(tmp_path: Path) -> AsyncIterator[HealthServer]:
    authority = CertificateAuthority(tmp_path / "tls")
    tls = authority.ensure(["localhost", "127.0.0.1"])
    credentials = grpc.ssl_server_credentials([(tls.server_key_pem, tls.server_cert_pem)])
    server = grpc.aio.server()
    health = await add_health_and_reflection(server)  # as a coordinator starts: a standby
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield HealthServer(server, health, port, authority.ca_path)
    finally:
        await server.stop(None)


async def probe(*argv: str | Path) -> tuple[int, str]:
    """The probe's exit status and what it printed (the server answers on this loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(PROBE), *map(str, argv),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, output.decode()


async def test_a_standby_is_alive_but_not_ready(health_server: HealthServer) -> None:
    # liveness (and compose's healthcheck): the process answers, so no restart
    assert await probe(health_server.address, health_server.ca) == (0, "")
    # readiness: the BuildService is NOT_SERVING on a standby, so no Service routes to it
    status, output = await probe("--service", BUILD_SERVICE, health_server.address,
                                 health_server.ca)  # fmt: skip
    assert status == 1
    assert f"health of {BUILD_SERVICE}: NOT_SERVING" in output


async def test_the_active_coordinator_is_ready(health_server: HealthServer) -> None:
    await set_serving(health_server.health, True)  # what a won election announces
    argv = (health_server.address, health_server.ca)
    assert await probe("--service", BUILD_SERVICE, *argv) == (0, "")
    assert await probe(*argv, "--service", BUILD_SERVICE) == (0, "")  # flag after, as well
    assert await probe(*argv) == (0, "")
    await set_serving(health_server.health, False)  # demoted: out of the Service again
    status, output = await probe("--service", BUILD_SERVICE, *argv)
    assert status == 1 and "NOT_SERVING" in output


async def test_an_unknown_service_or_unreadable_ca_fails_with_the_reason(
    health_server: HealthServer, tmp_path: Path
) -> None:
    status, output = await probe("--service", "polyarch.v1.NoSuchService",
                                 health_server.address, health_server.ca)  # fmt: skip
    assert status == 1 and "health check failed: NOT_FOUND" in output
    missing = tmp_path / "absent-ca.pem"
    status, output = await probe(health_server.address, missing)
    assert status == 1 and f"cannot read the CA file {missing}" in output
    status, output = await probe(health_server.address)  # CA_PEM missing: a usage error
    assert status == 2 and "CA_PEM" in output

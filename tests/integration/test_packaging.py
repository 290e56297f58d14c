"""deploy/kubernetes/probes/, run as the kubelet (or compose's healthcheck) would, against a real
TLS coordinator and a real agent's metrics endpoint."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prometheus_client import start_http_server

from polyarch.coordinator.trust.pki import CertificateAuthority
from tests.support.farm import Farm
from tests.support.poll import poll_until
from tests.support.services import free_port
from tests.unit.test_agent_assignments import HeldBuilder

PROBES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "probes"


def probe_script(name: str) -> Path:
    """A probe script, as deploy/kubernetes/ ships it (compose mounts the same files)."""
    path = PROBES / name
    assert path.is_file(), path
    return path


async def probe(*argv: str | Path) -> tuple[int, str]:
    """Runs a probe as an exec probe does: exit status and what it printed. Asynchronously,
    because the coordinator answering it runs on this event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *map(str, argv),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, output.decode()


async def test_coordinator_health_probe_passes_over_tls_with_the_coordinators_ca(
    farm: Farm, tmp_path: Path
) -> None:
    script = probe_script("coordinator_health.py")
    ca = farm.coordinator.config.data_dir / "tls" / "ca.pem"
    # The address as in the StatefulSet: loopback, which the server certificate always names.
    address = f"127.0.0.1:{farm.coordinator.port}"
    status, output = await probe(script, address, ca)
    assert (status, output) == (0, "")


async def test_coordinator_health_probe_fails_on_another_ca_or_a_closed_port(
    farm: Farm, tmp_path: Path
) -> None:
    script = probe_script("coordinator_health.py")
    other = CertificateAuthority(tmp_path / "other-tls")
    other.ensure(["localhost"])
    status, output = await probe(script, f"127.0.0.1:{farm.coordinator.port}", other.ca_path)
    assert status == 1 and "health check failed" in output
    ca = farm.coordinator.config.data_dir / "tls" / "ca.pem"
    status, output = await probe(script, f"127.0.0.1:{free_port()}", ca)
    assert status == 1 and "UNAVAILABLE" in output


async def test_agent_readiness_probe_follows_the_connected_metric(
    farm: Farm, tmp_path: Path
) -> None:
    script = probe_script("agent_connected.py")
    agent = await farm.add_agent("k8s-probe", HeldBuilder(), native=["linux/amd64"])
    server, thread = start_http_server(0, addr="127.0.0.1", registry=agent.metrics.registry)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        assert await probe(script, url) == (0, "")
        await farm.stop_agent("k8s-probe")

        async def not_ready() -> bool:
            status, output = await probe(script, url)
            return status == 1 and "not connected" in output

        stopped: bool = await poll_until(
            not_ready, timeout=15, message="the probe still reports ready"
        )
        assert stopped
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

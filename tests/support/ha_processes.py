"""Coordinator processes on 127.0.0.1 sharing one PostgreSQL database, for HA tests: start
one, get its first admin token, ask it raw ListBuilds, and check a standby names the active."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from polyarch.client.credentials import Credentials
from polyarch.proto.trust import ClientTrust, aio_channel
from polyarch.proto.v1 import build_pb2, build_pb2_grpc

from .farm import POLYARCH
from .poll import poll_until, wait_until
from .services import free_port, stop_process


@dataclass
class Process:
    """One `polyarch coordinator` process and its addresses."""

    name: str
    address: str
    metrics_url: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """One unlabelled sample from its --metrics-listen endpoint (a quick local scrape)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert found, f"{self.name}: no {name} in its metrics"
        return float(found.group(1))


@contextlib.contextmanager
def coordinator(work: Path, name: str, dsn: str) -> Iterator[Process]:
    """A coordinator on free 127.0.0.1 ports, TLS as deployed; stopped by its PID after."""
    port, agent_port, metrics_port = free_port(), free_port(), free_port()
    data_dir, log_path = work / name, work / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [POLYARCH, "coordinator", "--listen", f"127.0.0.1:{port}", "--data-dir",
             str(data_dir), "--agent-listen", f"127.0.0.1:{agent_port}", "--metrics-listen",
             f"127.0.0.1:{metrics_port}", "--database", dsn, "--agent-timeout", "5"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    started = Process(name, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics",
                      data_dir, log_path, proc)  # fmt: skip
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}: {started.log()[-3000:]}")
            return "polyarch coordinator listening" in started.log()

        wait_until(ready, timeout=30, message=f"coordinator {name} listening")
        yield started
    finally:
        stop_process(proc)


async def list_builds(address: str, trust: ClientTrust) -> list[str] | grpc.aio.AioRpcError:
    """A raw ListBuilds: the build ids, or the refusal (code, details, trailing metadata)."""
    async with aio_channel(address, trust) as channel:
        try:
            reply = await build_pb2_grpc.BuildServiceStub(channel).ListBuilds(
                build_pb2.ListBuildsRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            return error
    return [build.id for build in reply.builds]


def trailing(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: str(value) for key, value in error.trailing_metadata() or ()}


async def accepted(process: Process, trust: ClientTrust) -> list[str] | None:
    """The build ids once `process` serves ListBuilds; None while it refuses."""
    answer = await list_builds(process.address, trust)
    return answer if isinstance(answer, list) else None


async def assert_standby(standby: Process, active: Process, trust: ClientTrust) -> None:
    """The standby refuses with UNAVAILABLE, naming the active's address (once it read the
    term: it follows it every second); its gauge says 0, the active's 1."""

    async def redirects() -> grpc.aio.AioRpcError | None:
        answer = await list_builds(standby.address, trust)
        assert isinstance(answer, grpc.aio.AioRpcError), f"{standby.name} served: {answer}"
        assert answer.code() == grpc.StatusCode.UNAVAILABLE, answer
        return answer if trailing(answer).get("polyarch-active") == active.address else None

    refusal = await poll_until(redirects, timeout=10, message=f"{standby.name} names the active")
    assert "standby" in (refusal.details() or "") and active.address in (refusal.details() or "")
    assert standby.metric("polyarch_coordinator_active") == 0
    assert active.metric("polyarch_coordinator_active") == 1
    assert await health(standby, trust) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await health(active, trust) == health_pb2.HealthCheckResponse.SERVING


async def health(process: Process, trust: ClientTrust) -> int:
    """The BuildService's status in the standard health service (open on a standby too)."""
    async with aio_channel(process.address, trust) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="polyarch.v1.BuildService"), timeout=5
        )
    return int(reply.status)


async def first_admin(first: Process) -> tuple[str, ClientTrust]:
    """The admin token the first coordinator on an empty database writes at start, and a
    trust holding it and that coordinator's CA (resolved with the token's pin)."""
    token_file = first.data_dir / "admin.token"
    wait_until(token_file.exists, timeout=10, message=f"{first.name}'s first admin token")
    admin = token_file.read_text().strip()
    ca = await asyncio.to_thread(Credentials(token=admin).resolve, first.address)
    return admin, ClientTrust(root_pem=ca.root_pem, token=admin)

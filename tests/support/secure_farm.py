"""A real `polyarch coordinator` process with TLS and tokens on 127.0.0.1, for probes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from polyarch.agent.enrolment import Identity, enrol
from polyarch.client.credentials import Credentials
from polyarch.proto.trust import ClientTrust, Role, aio_channel
from polyarch.proto.v1 import trust_pb2, trust_pb2_grpc
from tests.support.farm import POLYARCH
from tests.support.poll import wait_until
from tests.support.services import free_port, stop_process

ROLE_CODES = {
    Role.READ: trust_pb2.TOKEN_ROLE_READ,
    Role.CI: trust_pb2.TOKEN_ROLE_CI,
    Role.ADMIN: trust_pb2.TOKEN_ROLE_ADMIN,
    Role.AGENT: trust_pb2.TOKEN_ROLE_AGENT,
}


@dataclass
class SecureCoordinator:
    """The process, its addresses, its data dir and every token the probes made."""

    address: str
    agent_address: str
    data_dir: Path
    metrics_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    secrets_used: list[str] = field(default_factory=list)

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def ca_pem(self) -> bytes:
        """The coordinator's own CA, or (an operator's PKI) the root its admin token pins."""
        own = self.data_dir / "tls" / "ca.pem"
        if own.exists():
            return own.read_bytes()
        pinned = Credentials(token=self.admin_token).resolve(self.address).root_pem
        assert pinned is not None
        return pinned

    def alive(self) -> bool:
        return self.proc.poll() is None

    def trust(self, token: str | None) -> ClientTrust:
        """TLS against our CA, with `token` on every call (None: no token at all)."""
        return ClientTrust(root_pem=self.ca_pem, token=token)

    def channel(self, token: str | None) -> grpc.aio.Channel:
        return aio_channel(self.address, self.trust(token))

    async def token(self, role: Role, ttl: int = 0) -> str:
        """A token made through the real API by the admin (remembered for the secret grep)."""
        async with self.channel(self.admin_token) as channel:
            stub = trust_pb2_grpc.TrustServiceStub(channel)
            created = await stub.CreateToken(
                trust_pb2.CreateTokenRequest(
                    role=ROLE_CODES[role], ttl_seconds=ttl, description=f"probe {role.value}"
                )
            )
        self.secrets_used.append(created.token_text)
        return str(created.token_text)

    async def enrol(self, name: str, replace: bool = False) -> Identity:
        """Enrols `name` with a fresh agent token, as `polyarch agent` does."""
        trust = await asyncio.to_thread(
            Credentials(token=await self.token(Role.AGENT)).resolve, self.address
        )
        return await enrol(self.address, trust, name, replace)

    def credentials(self) -> Credentials:
        return Credentials(token=self.admin_token)

    def cli(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {"POLYARCH_COORDINATOR": self.address, "PATH": "/usr/bin:/bin",
               "POLYARCH_TOKEN": token or self.admin_token}  # fmt: skip
        if "PYTHONPATH" in os.environ:  # a worktree's code, as the coordinator runs it
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return subprocess.run(
            [POLYARCH, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return str(response.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_secure_coordinator(work_dir: Path, *extra: str) -> Iterator[SecureCoordinator]:
    """`polyarch coordinator` with its own CA on free 127.0.0.1 ports; stopped by PID after."""
    port, agent_port, metrics_port = free_port(), free_port(), free_port()
    data_dir = work_dir / "coordinator"
    log_path = work_dir / "coordinator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [POLYARCH, "coordinator", "--listen", f"127.0.0.1:{port}", "--data-dir",
             str(data_dir), "--agent-listen", f"127.0.0.1:{agent_port}",
             "--metrics-listen", f"127.0.0.1:{metrics_port}", *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        token_file = data_dir / "admin.token"

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"coordinator exited: {log_path.read_text()[-3000:]}")
            return token_file.exists() and b"listening" in log_path.read_bytes()

        wait_until(ready, timeout=30, message=f"secure coordinator ready (log {log_path})")
        yield SecureCoordinator(
            f"127.0.0.1:{port}", f"127.0.0.1:{agent_port}", data_dir,
            f"http://127.0.0.1:{metrics_port}/metrics", proc, log_path,
        )  # fmt: skip
    finally:
        stop_process(proc)


@contextlib.asynccontextmanager
async def agent_stream(
    coordinator: SecureCoordinator, identity: Identity, hello_name: str | None = None, **hello: Any
) -> AsyncIterator[tuple[asyncio.Queue[Any], grpc.aio.StreamStreamCall[Any, Any]]]:
    """A hand-driven agent channel under `identity` (a fake agent that speaks the protocol):
    yields the outbox queue (put AgentMessages, None to end) and the call (read messages)."""
    from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc

    outbox: asyncio.Queue[Any] = asyncio.Queue()
    fields = {"builder": "probe", "native_platforms": ["linux/amd64"], "slots": 1, **hello}
    await outbox.put(
        agent_pb2.AgentMessage(
            hello=agent_pb2.AgentHello(name=hello_name or identity.name, **fields)
        )
    )

    async def requests() -> AsyncIterator[Any]:
        while (message := await outbox.get()) is not None:
            yield message

    async with aio_channel(identity.agent_address, identity.trust()) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(requests())
        try:
            yield outbox, call
        finally:
            call.cancel()


def builds_json(coordinator: SecureCoordinator) -> Any:
    done = coordinator.cli("builds", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def healthy(coordinator: SecureCoordinator) -> bool:
    """The process runs and answers an authenticated list call."""
    if not coordinator.alive():
        return False
    done = coordinator.cli("agents", "--json")
    return done.returncode == 0


def grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None


def kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        stop_process(proc)

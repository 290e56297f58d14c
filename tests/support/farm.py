"""An in-process farm for tests: a real coordinator on port 0 and agents with real builders."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyarch.agent.builders.base import Builder
from polyarch.agent.enrolment import enrol
from polyarch.agent.runtime import Agent, AgentConfig
from polyarch.client.credentials import Credentials
from polyarch.coordinator.server import Coordinator, CoordinatorConfig
from polyarch.proto.platforms import parse_platform
from polyarch.proto.trust import ClientTrust, Role

POLYARCH = str(Path(sys.executable).parent / "polyarch")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def metadata(self, path: Path) -> dict[str, object]:
        data: dict[str, object] = json.loads(path.read_text())
        return data


@dataclass
class Farm:
    coordinator: Coordinator
    work_dir: Path
    agents: dict[str, tuple[Agent, asyncio.Task[None]]] = field(default_factory=dict)
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.coordinator.address

    @property
    def admin_token_file(self) -> Path:
        return self.coordinator.config.data_dir / "admin.token"

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    def token(self, role: Role, ttl: float = 0) -> str:
        """A new token of `role` (made directly in the coordinator, as `token create` would)."""
        tokens = self.coordinator.tokens
        assert tokens is not None, "the farm runs --insecure"
        return str(tokens.create(role, ttl, f"test {role.value}"))

    def credentials(self, token: str | None = None) -> Credentials:
        """What a client of this farm presents: a token (admin by default), CA pinned by it."""
        if self.coordinator.config.insecure:
            return Credentials(insecure=True)
        return Credentials(token=token or self.admin_token)

    async def agent_channel(self, name: str) -> tuple[ClientTrust, str]:
        """Enrols `name` with an agent token: (mTLS trust, agent channel address)."""
        if self.coordinator.config.insecure:
            return ClientTrust(insecure=True), self.address
        credentials = self.credentials(self.token(Role.AGENT))
        trust = await asyncio.to_thread(credentials.resolve, self.address)
        identity = await enrol(self.address, trust, name, replace=True)
        return identity.trust(), identity.agent_address

    async def add_agent(
        self,
        name: str,
        builder: Builder,
        native: list[str],
        emulated: list[str] = [],  # noqa: B006 - never mutated
        slots: int = 2,
    ) -> Agent:
        trust, channel_address = await self.agent_channel(name)
        config = AgentConfig(
            coordinator=self.address, name=name,
            native=[parse_platform(p) for p in native],
            emulated=[parse_platform(p) for p in emulated],
            slots=slots, work_dir=self.work_dir / "agents" / name, heartbeat_interval=1.0,
            trust=trust, channel_address=channel_address,
        )  # fmt: skip
        agent = Agent(config, builder)
        task = asyncio.create_task(agent.run(), name=f"agent-{name}")
        self.agents[name] = (agent, task)
        await asyncio.wait_for(agent.connected.wait(), 15)
        return agent

    async def stop_agent(self, name: str) -> None:
        agent, task = self.agents.pop(name)
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)

    async def spawn_agent_process(
        self, name: str, docker_binary: str, *extra: str
    ) -> asyncio.subprocess.Process:
        """A real `polyarch agent` process (docker builder, native linux/amd64)."""
        log = (self.work_dir / f"agent-{name}.log").open("wb")
        env = dict(os.environ, POLYARCH_TOKEN=self.token(Role.AGENT))
        proc = await asyncio.create_subprocess_exec(
            POLYARCH, "agent", "--coordinator", self.address, "--name", name, "--replace",
            "--builder", "docker", "--docker-binary", docker_binary, "--native", "linux/amd64",
            "--emulated", "none", "--work-dir", str(self.work_dir / "agents" / name), *extra,
            stdout=log, stderr=log, env=env,
        )  # fmt: skip
        log.close()
        self.processes.append(proc)
        return proc

    def build_started(self, build_id: str, platform: str) -> bool:
        """True once the platform's job of the build runs on an agent."""
        manager = self.coordinator.manager
        assert manager is not None
        live = manager.ledger.live(build_id)
        jobs = live[1] if live is not None else []
        return any(j.platform == platform and j.state.value == "running" for j in jobs)

    def cli_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """The environment a `polyarch` client command of this farm runs in (as its admin)."""
        full = dict(os.environ, POLYARCH_COORDINATOR=self.address, **(env or {}))
        if self.coordinator.config.insecure:
            full["POLYARCH_INSECURE"] = "1"
        else:
            full["POLYARCH_TOKEN_FILE"] = str(self.admin_token_file)
        return full

    async def cli(
        self, *args: str, timeout: float = 600, env: dict[str, str] | None = None
    ) -> CliResult:
        """Runs the real `polyarch` console script against this farm (as its admin, unless
        args carry a --token); `env` adds to the environment."""
        proc = await asyncio.create_subprocess_exec(
            POLYARCH, *args, env=self.cli_env(env),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return CliResult(proc.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def running_farm(work_dir: Path, **settings: Any) -> AsyncIterator[Farm]:
    """A started farm; `settings` are CoordinatorConfig fields (e.g. immutable_tags=["v*"])."""
    coordinator = Coordinator(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            data_dir=work_dir / "coordinator",
            metrics_listen="127.0.0.1:0",
            **settings,
        )
    )
    await coordinator.start()
    farm = Farm(coordinator, work_dir)
    try:
        yield farm
    finally:
        for name in list(farm.agents):
            await farm.stop_agent(name)
        for proc in farm.processes:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await coordinator.stop(grace=1)


def builder_named(kind: str, docker_binary: str) -> Builder:
    """A docker (BuildKit through `docker_binary`) or buildah builder."""
    from polyarch.agent.builders.buildah import BuildahBuilder
    from polyarch.agent.builders.docker import DockerBuilder

    return DockerBuilder(docker_binary) if kind == "docker" else BuildahBuilder()

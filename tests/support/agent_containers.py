"""A farm of real processes for fault tests: a coordinator subprocess and agents in containers.

Every agent runs in its own container (its own network namespace, its own address
on a bridge network the fleet creates), started with testcontainers from a tiny
local image (`polyarch-test/agent-host`, made offline with `docker import`) that
bind-mounts the host's runtime read-only: /usr, /etc, the Python the venv points
at and the repository (its venv and editable link tree). The agent's docker
builder drives the host's dockerd through the mounted socket, so it pushes to the
session registry on the host's 127.0.0.1.

The coordinator is a real `polyarch coordinator` on the host, listening on the
network's gateway address (the host end of the bridge). Tests reach it only there,
and the coordinator's metrics only on 127.0.0.1. Faults are injected with the real
tools: `docker kill`, `docker network disconnect`, SIGKILL of the coordinator PID.
Only what a Fleet started is stopped, by container id or PID.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network

from .poll import wait_until
from .services import REPO_ROOT, stop_process

AGENT_IMAGE = "polyarch-test/agent-host:latest"
DOCKER = "/usr/bin/docker"
VENV = Path(sys.prefix)
POLYARCH = str(VENV / "bin" / "polyarch")
AGENT_NATIVE = "linux/amd64"
AGENT_EMULATED = "linux/arm64,linux/arm/v7"
# Directories the agent-host image holds; everything else comes from read-only bind mounts.
_IMAGE_DIRS = ("etc", "tmp", "var", "run", "proc", "sys", "dev", "root", "usr", "work")
# Debian 12 is merged-/usr: the top-level names are links into /usr, as on the host.
_IMAGE_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
TERMINAL_BUILD_STATES = frozenset({"succeeded", "failed", "cancelled"})

READY_TIMEOUT = 30.0
CLI_TIMEOUT = 30.0


class FleetError(RuntimeError):
    """The fault-test fleet could not be set up; the message says what failed."""


def _docker(
    *args: str, check: bool = True, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise FleetError(f"docker {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


def _image_tar() -> bytes:
    """A root filesystem of empty directories and the merged-/usr links; no files at all."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in _IMAGE_DIRS:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        for name, target in _IMAGE_LINKS.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def ensure_agent_image() -> str:
    """Imports `polyarch-test/agent-host:latest` unless dockerd has it; returns its name."""
    if _docker("image", "inspect", AGENT_IMAGE, check=False).returncode == 0:
        return AGENT_IMAGE
    done = subprocess.run(
        [DOCKER, "import", "--change", "WORKDIR /work", "-", AGENT_IMAGE],
        input=_image_tar(), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise FleetError(f"docker import of {AGENT_IMAGE} failed: {done.stderr.decode()}")
    return AGENT_IMAGE


def runtime_mounts() -> list[str]:
    """Host directories an agent container needs (read-only): the OS, Python, the repository."""
    mounts = ["/usr", "/etc"]
    for path in (Path(sys.base_prefix).resolve(), VENV.resolve(), REPO_ROOT):
        if not any(path.is_relative_to(m) for m in mounts):
            mounts = [m for m in mounts if not Path(m).is_relative_to(path)]
            mounts.append(str(path))
    return mounts


def free_port(host: str) -> int:
    """A TCP port free on host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# -- the coordinator subprocess ----------------------------------------------------------------


@dataclass
class CoordinatorProcess:
    """`polyarch coordinator` on the host; restartable on the same data dir and port."""

    listen: str
    agent_listen: str
    data_dir: Path
    log_dir: Path
    metrics_listen: str
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    extra_args: list[str] = field(default_factory=list)  # e.g. --database, --context-dir

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def address(self) -> str:
        return self.listen

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.data_dir.name}-{self.starts}.log"

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Starts the process and waits until its gRPC port accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "coordinator already running"
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [POLYARCH, "coordinator", "--listen", self.listen, "--data-dir",
                 str(self.data_dir), "--metrics-listen", self.metrics_listen,
                 "--agent-listen", self.agent_listen, *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        host, _, port = self.listen.rpartition(":")
        proc = self.proc

        def accepting() -> bool:
            if proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:]
                raise FleetError(f"coordinator exited with {proc.returncode}: {tail}")
            with socket.create_connection((host, int(port)), timeout=1):
                return True

        wait_until(
            accepting, timeout=timeout, interval=0.1, ignore=(OSError,),
            message=f"coordinator accepting on {self.listen} (log {self.log_path})",
        )  # fmt: skip

    def sigkill(self) -> None:
        """SIGKILL, as a crash would: no graceful shutdown, nothing flushed."""
        assert self.proc is not None and self.proc.poll() is None, "coordinator not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def logs(self) -> str:
        return "\n".join(
            f"--- {self.data_dir.name} run {n} ---\n"
            + (self.log_dir / f"{self.data_dir.name}-{n}.log").read_text()
            for n in range(1, self.starts + 1)
            if (self.log_dir / f"{self.data_dir.name}-{n}.log").exists()
        )


# -- agent containers --------------------------------------------------------------------------


@dataclass
class AgentContainer:
    """One `polyarch agent` in its own container on the fleet's network."""

    name: str
    container: DockerContainer
    network: str

    @property
    def id(self) -> str:
        container_id: str = self.container.get_container_id()
        return container_id

    def kill(self) -> None:
        """`docker kill`: SIGKILL to the agent, its network namespace torn down with it."""
        _docker("kill", self.id)

    def restart(self) -> None:
        """`docker start` of the killed container: the same agent name, a fresh work dir."""
        _docker("start", self.id)

    def disconnect(self) -> None:
        """`docker network disconnect`: the agent keeps running but can reach nobody."""
        _docker("network", "disconnect", self.network, self.id)

    def reconnect(self) -> None:
        _docker("network", "connect", self.network, self.id)

    def ip(self) -> str:
        out = _docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", self.id)
        networks: dict[str, Any] = json.loads(out.stdout)
        return str(networks.get(self.network, {}).get("IPAddress", ""))

    def logs(self) -> str:
        done = _docker("logs", self.id, check=False)
        return done.stdout + done.stderr


# -- the fleet ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    """A coordinator subprocess plus agent containers on one test-created docker network."""

    network: Network
    gateway: str
    coordinator: CoordinatorProcess
    work_dir: Path
    agents: dict[str, AgentContainer] = field(default_factory=dict)
    agent_token: str = ""

    @property
    def address(self) -> str:
        return self.coordinator.address

    def _env(self) -> dict[str, str]:
        return dict(
            os.environ, POLYARCH_COORDINATOR=self.address,
            POLYARCH_TOKEN_FILE=str(self.coordinator.admin_token_file),
        )  # fmt: skip

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """The real `polyarch` CLI against this fleet's coordinator, as its admin."""
        return subprocess.run(
            [POLYARCH, *args], env=self._env(), capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip

    def enrolment_token(self) -> str:
        """One agent token for the fleet (`polyarch token create --role agent`)."""
        if not self.agent_token:
            done = self.cli("token", "create", "--role", "agent", "--description", "fleet")
            if done.returncode != 0:
                raise FleetError(f"token create exited {done.returncode}: {done.stderr}")
            self.agent_token = done.stdout.strip()
        return self.agent_token

    def popen_cli(self, *args: str) -> subprocess.Popen[str]:
        """The real `polyarch` CLI in the background (stdout and stderr piped)."""
        env = self._env()
        return subprocess.Popen(
            [POLYARCH, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def cli_json(self, *args: str) -> Any:
        done = self.cli(*args, "--json")
        if done.returncode != 0:
            raise FleetError(f"polyarch {' '.join(args)} --json exited {done.returncode}: "
                             f"{done.stderr.strip()}")  # fmt: skip
        return json.loads(done.stdout)

    def agents_json(self) -> list[dict[str, Any]]:
        agents: list[dict[str, Any]] = self.cli_json("agents")
        return agents

    def builds_json(self, limit: int = 200) -> list[dict[str, Any]]:
        builds: list[dict[str, Any]] = self.cli_json("builds", "--limit", str(limit))
        return builds

    def build_json(self, build_id: str) -> dict[str, Any]:
        for build in self.builds_json():
            if build["id"] == build_id:
                return build
        raise FleetError(f"build {build_id} not listed by `polyarch builds --json`")

    def ready_agents(self) -> set[str]:
        return {a["name"] for a in self.agents_json() if a["state"] == "ready"}

    def wait_agents_ready(self, *names: str, timeout: float = READY_TIMEOUT) -> None:
        """Polls `polyarch agents --json` until every named agent is listed as ready."""
        wanted = set(names or self.agents)
        wait_until(lambda: wanted <= self.ready_agents(), timeout=timeout, interval=0.25,
                   ignore=(FleetError,), message=f"agents {sorted(wanted)} ready")  # fmt: skip

    def add_agent(self, name: str, *, slots: int = 2, wait: bool = True) -> AgentContainer:
        """Starts `polyarch agent` in a new container on the fleet's network."""
        container = DockerContainer(AGENT_IMAGE, network=self.network)
        for path in runtime_mounts():
            container.with_volume_mapping(path, path, "ro")
        container.with_volume_mapping("/var/run/docker.sock", "/var/run/docker.sock", "rw")
        container.with_tmpfs_mount("/work").with_tmpfs_mount("/tmp")
        # the enrolled identity outlives the container's restarts, as on a real host
        state = self.work_dir / "agent-state" / name
        state.mkdir(parents=True, exist_ok=True)
        container.with_volume_mapping(str(state), "/state", "rw")
        container.with_name(f"{self.network.name}-{name}")
        container.with_envs(HOME="/root", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
                            POLYARCH_TOKEN=self.enrolment_token())  # fmt: skip
        container.with_kwargs(labels={"polyarch-test": self.network.name})
        container.with_command([
            POLYARCH, "agent", "--coordinator", self.address, "--name", name,
            "--builder", "docker", "--docker-binary", DOCKER,
            "--native", AGENT_NATIVE, "--emulated", AGENT_EMULATED,
            "--slots", str(slots), "--work-dir", "/work", "--state-dir", "/state",
            *self.agent_args(),
        ])  # fmt: skip
        agent = AgentContainer(name, container, self.network.name)
        self.agents[name] = agent  # registered first, so teardown removes it even if start fails
        container.start()
        if wait:
            self.wait_agents_ready(name)
        return agent

    def start_agents(self, names: Sequence[str], slots: int = 2) -> None:
        """Starts the agents together, then waits until all are ready."""
        for name in names:
            self.add_agent(name, slots=slots, wait=False)
        if names:
            self.wait_agents_ready(*names)

    def remove_agents(self) -> None:
        """`docker rm -f` by id: only the containers this fleet started."""
        for agent in self.agents.values():
            if agent.container._container is not None:
                _docker("rm", "-f", agent.id, check=False)

    def agent_args(self) -> list[str]:
        """More `polyarch agent` flags (a fleet of several coordinators adds some)."""
        return []

    def running_job(self, build_id: str, platform: str) -> dict[str, Any] | None:
        """The build's job for platform when it is `running` on some agent, else None."""
        for job in self.build_json(build_id)["jobs"]:
            if job["platform"] == platform and job["state"] == "running" and job["agent"]:
                found: dict[str, Any] = job
                return found
        return None

    def diagnostics(self) -> str:
        """Coordinator and agent logs, for a failure message."""
        parts = [self.coordinator.logs()[-6000:]]
        for agent in self.agents.values():
            parts.append(f"--- agent {agent.name} ---\n{agent.logs()[-3000:]}")
        return "\n".join(parts)


def _network_gateway(network: Network) -> str:
    out = _docker("network", "inspect", "--format", "{{json .IPAM.Config}}", network.name)
    configs: list[dict[str, str]] = json.loads(out.stdout)
    for config in configs:
        if config.get("Gateway") and ":" not in config["Gateway"]:
            return config["Gateway"]
    raise FleetError(f"network {network.name} has no IPv4 gateway: {configs}")


@contextmanager
def fleet_network() -> Iterator[tuple[Network, str]]:
    """A docker network of the test's own (labelled, named at random) and its IPv4 gateway,
    the host end where coordinators listen; removed by name afterwards."""
    network = Network(docker_network_kw={"labels": {"polyarch-test": "fleet"}})
    network.name = f"polyarch-test-{secrets.token_hex(4)}"
    network.create()
    try:
        yield network, _network_gateway(network)
    finally:
        network.remove()


def gateway_coordinator(
    gateway: str, data_dir: Path, log_dir: Path, extra_args: Sequence[str] = ()
) -> CoordinatorProcess:
    """A coordinator (not started) on free ports of the gateway; metrics on 127.0.0.1."""
    return CoordinatorProcess(
        listen=f"{gateway}:{free_port(gateway)}", agent_listen=f"{gateway}:{free_port(gateway)}",
        data_dir=data_dir, log_dir=log_dir,
        metrics_listen=f"127.0.0.1:{free_port('127.0.0.1')}", extra_args=list(extra_args),
    )  # fmt: skip


@contextmanager
def running_fleet(
    work_dir: Path, agent_names: Sequence[str] = (), slots: int = 2
) -> Iterator[Fleet]:
    """A docker network, a coordinator on its gateway and agent containers, all torn down after.

    Teardown runs even when set-up or the test fails: agent containers are removed
    by id, the coordinator stopped by PID, the network removed by name.
    """
    ensure_agent_image()
    work_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        network, gateway = cleanup.enter_context(fleet_network())
        coordinator = gateway_coordinator(gateway, work_dir / "coordinator", work_dir)
        cleanup.callback(coordinator.stop)
        coordinator.start()
        fleet = Fleet(network, gateway, coordinator, work_dir)
        cleanup.callback(fleet.remove_agents)
        fleet.start_agents(agent_names, slots)
        yield fleet


def wait_for(condition: Any, *, timeout: float, message: str, interval: float = 0.25) -> Any:
    """wait_until with FleetError (coordinator briefly unreachable) counted as "not yet"."""
    return wait_until(condition, timeout=timeout, interval=interval, message=message,
                      ignore=(FleetError,))  # fmt: skip

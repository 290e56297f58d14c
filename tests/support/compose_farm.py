"""deploy/compose/compose.yaml run for real: Docker Compose v2 on the farm's own images.

Compose comes from Debian (deploy/dev/compose-v2.sh). No image can be pulled here, so the
registry and Prometheus services run this machine's own Debian binaries (docker-registry and
prometheus, which need only libc) in images made with `docker import`; the coordinator and
agent images are the ones the farm just built (tests/integration/test_images.py). The file's
own first-start steps are followed: registry and coordinator, an agent token from the
coordinator, then everything. Published ports are free ones on 127.0.0.1; the project is
removed with its volumes afterwards.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .agent_containers import DOCKER, FleetError, _docker, free_port
from .agent_containers import POLYARCH as POLYARCH_CLI
from .poll import wait_until
from .services import REPO_ROOT

COMPOSE_SCRIPT = REPO_ROOT / "deploy" / "dev" / "compose-v2.sh"
REGISTRY_IMAGE = "polyarch-test/compose-registry:1"
PROMETHEUS_IMAGE = "polyarch-test/compose-prometheus:1"
POLYARCH = "/opt/polyarch/bin/polyarch"
COORDINATOR_STATE = "/var/lib/polyarch/coordinator"
REGISTRY_CONFIG = """version: 0.1
storage:
  filesystem:
    rootdirectory: /var/lib/registry
http:
  addr: :5000
"""
# what the two binaries need: the loader and libc (both are Go programs linked to libc only)
_LIBS = ("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6")


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _import(
    image: str, files: dict[str, str], extra: dict[str, bytes], entrypoint: list[str]
) -> None:
    if _docker("image", "inspect", image, check=False).returncode == 0:
        return
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in ("tmp", "etc", "var/lib/registry", "prometheus"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755
            tar.addfile(info)
        for inside, outside in files.items():
            tar.add(os.path.realpath(outside), inside)
        for inside, data in extra.items():
            _add_file(tar, inside, data)
    change = f"ENTRYPOINT {json.dumps(entrypoint)}"
    done = subprocess.run([DOCKER, "import", "--change", change, "-", image],
                          input=buffer.getvalue(), capture_output=True, timeout=120,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        raise FleetError(f"docker import of {image} failed: {done.stderr.decode()}")


def ensure_service_images() -> tuple[str, str]:
    """The registry and Prometheus images (made once; the machine's own binaries)."""
    libs = {path.lstrip("/"): path for path in _LIBS}
    _import(REGISTRY_IMAGE, {"usr/bin/docker-registry": "/usr/bin/docker-registry", **libs},
            {"etc/docker/registry/config.yml": REGISTRY_CONFIG.encode()},
            ["/usr/bin/docker-registry", "serve", "/etc/docker/registry/config.yml"])  # fmt: skip
    _import(PROMETHEUS_IMAGE, {"usr/bin/prometheus": "/usr/bin/prometheus", **libs}, {},
            ["/usr/bin/prometheus"])  # fmt: skip
    return REGISTRY_IMAGE, PROMETHEUS_IMAGE


@dataclass
class ComposeFarm:
    """A running compose project and what the host needs to use it."""

    compose: list[str]
    env: dict[str, str]
    work: Path
    registry: str  # the farm's registry as the host reaches it
    coordinator: str
    prometheus: str

    def run(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.compose, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip
        if done.returncode != 0:
            raise FleetError(f"compose {' '.join(args)} failed: {done.stderr[-3000:]}")
        return done

    def coordinator_file(self, path: str, dest: Path) -> Path:
        dest.write_bytes(self.run("exec", "-T", "coordinator", "cat", path).stdout.encode())
        dest.chmod(0o600)
        return dest

    def cli(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """The host's `polyarch` against the farm, as an admin trusting the farm's CA."""
        env = dict(os.environ, POLYARCH_COORDINATOR=self.coordinator,
                   POLYARCH_CA_FILE=str(self.work / "ca.pem"),
                   POLYARCH_TOKEN_FILE=str(self.work / "admin.token"))  # fmt: skip
        return subprocess.run([POLYARCH_CLI, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip

    def logs(self) -> str:
        done = subprocess.run([*self.compose, "logs", "--no-color", "--tail", "40"], env=self.env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        return done.stdout[-6000:]

    def prometheus_get(self, path: str, **params: str) -> Any:
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            response = client.get(f"http://{self.prometheus}{path}", params=params)
            response.raise_for_status()
            return response.json()["data"]


def _health(farm: ComposeFarm, service: str) -> str:
    container = farm.run("ps", "-q", service).stdout.strip()
    state = _docker("inspect", "--format", "{{.State.Health.Status}}", container).stdout
    return state.strip()


@contextmanager
def running_compose_farm(work: Path, image_prefix: str, tag: str) -> Iterator[ComposeFarm]:
    """Starts deploy/compose/compose.yaml as its header says and yields it once both agents
    are ready in the coordinator's listing; `compose down -v` afterwards."""
    done = subprocess.run(["bash", str(COMPOSE_SCRIPT)], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    if done.returncode != 0:
        raise FleetError(f"{COMPOSE_SCRIPT.name} failed: {done.stderr[-2000:]}")
    binary = done.stdout.strip().splitlines()[-1]
    registry_image, prometheus_image = ensure_service_images()
    # the compose file names files beside it and in ../kubernetes and ../prometheus
    deploy = work / "deploy"
    for part in ("compose", "kubernetes/probes", "prometheus"):
        shutil.copytree(REPO_ROOT / "deploy" / part, deploy / part)
    folder = deploy / "compose"
    (folder / "agent.token").write_text("")
    ports = {name: free_port("127.0.0.1") for name in ("REGISTRY", "COORDINATOR", "PROMETHEUS")}
    env = dict(os.environ, POLYARCH_IMAGE_PREFIX=image_prefix, POLYARCH_TAG=tag,
               POLYARCH_REGISTRY_IMAGE=registry_image, POLYARCH_PROMETHEUS_IMAGE=prometheus_image,
               **{f"POLYARCH_{name}_PORT": str(port) for name, port in ports.items()})  # fmt: skip
    project = f"polyarch-test-{secrets.token_hex(3)}"
    compose = [binary, "--project-name", project, "--project-directory", str(folder),
               "-f", str(folder / "compose.yaml")]  # fmt: skip
    host = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    farm = ComposeFarm(compose, env, work, host["REGISTRY"], host["COORDINATOR"],
                       host["PROMETHEUS"])  # fmt: skip
    try:
        try:
            _start(farm, folder)
        except Exception as exc:
            raise FleetError(f"{exc}\n--- compose logs ---\n{farm.logs()}") from exc
        yield farm
    finally:
        subprocess.run([*compose, "down", "-v", "--timeout", "20"], env=env,
                       capture_output=True, timeout=180, check=False)  # fmt: skip


def _start(farm: ComposeFarm, folder: Path) -> None:
    """The compose file's first start: registry and coordinator, an agent token, the rest."""
    farm.run("up", "-d", "registry", "coordinator")
    wait_until(lambda: _health(farm, "coordinator") == "healthy", timeout=120, interval=1.0,
               message="the compose coordinator's health check passes")  # fmt: skip
    token = farm.run(
        "exec", "-T", "coordinator", POLYARCH, "token", "create", "--role", "agent",
        "--coordinator", "127.0.0.1:7600", "--token-file", f"{COORDINATOR_STATE}/admin.token",
        "--description", "compose",
    ).stdout.strip()  # fmt: skip
    (folder / "agent.token").write_text(token + "\n")
    farm.run("up", "-d")
    farm.coordinator_file(f"{COORDINATOR_STATE}/tls/ca.pem", farm.work / "ca.pem")
    farm.coordinator_file(f"{COORDINATOR_STATE}/admin.token", farm.work / "admin.token")

    def ready() -> set[str]:
        listed = farm.cli("agents", "--json", timeout=30)
        if listed.returncode != 0:
            return set()
        return {a["name"] for a in json.loads(listed.stdout) if a["state"] == "ready"}

    wait_until(lambda: ready() == {"agent-1", "agent-2"}, timeout=120, interval=1.0,
               message="both compose agents ready")  # fmt: skip

"""Real services for tests: registries on 127.0.0.1, the offline base image, dockerd checks."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from .poll import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD_BINARY = "/usr/bin/htpasswd"
SKOPEO_BINARY = "/usr/bin/skopeo"
BASE_IMAGE_SCRIPT = REPO_ROOT / "deploy" / "dev" / "base-image.sh"
PYTHON_BASE_SCRIPT = REPO_ROOT / "deploy" / "docker" / "python-base.sh"
AGENT_BASE_SCRIPT = REPO_ROOT / "deploy" / "docker" / "agent-base.sh"
DEFAULT_DOCKER = "/usr/bin/docker"

REGISTRY_READY_TIMEOUT = 30.0
BASE_IMAGE_TIMEOUT = 600.0
# Cold: a Debian rootfs per arch, arm64's package scripts under QEMU (about 100 s here).
PYTHON_BASE_TIMEOUT = 900.0


class ServiceError(RuntimeError):
    """A test service could not be started or used; the message says why and where to look."""


@dataclass(frozen=True)
class Registry:
    """A CNCF distribution registry serving plain HTTP on 127.0.0.1 for this test session."""

    address: str  # "127.0.0.1:PORT", the form image references use
    storage: Path  # the filesystem driver's root directory
    log_path: Path
    pid: int
    username: str | None = None  # set when htpasswd auth is on
    password: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def reference(self, repository: str, tag: str = "latest") -> str:
        return f"{self.address}/{repository}:{tag}"


def docker_binary() -> str:
    """The Docker CLI to drive dockerd; the Debian 20.10 client unless POLYARCH_DOCKER says."""
    return os.environ.get("POLYARCH_DOCKER", DEFAULT_DOCKER)


def free_port() -> int:
    """A port free on 127.0.0.1 right now (callers retry if someone takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def htpasswd_entry(username: str, password: str) -> str:
    """One bcrypt htpasswd line, as distribution's htpasswd auth requires."""
    if not os.access(HTPASSWD_BINARY, os.X_OK):
        raise ServiceError(
            f"{HTPASSWD_BINARY} missing: run deploy/dev/bootstrap.sh (apache2-utils)"
        )
    out = subprocess.run(
        [HTPASSWD_BINARY, "-Bbn", username, password],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip() + "\n"


def _registry_config(
    storage: Path, port: int, htpasswd: Path | None, delete: bool = True
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": delete},
        },
        # A fixed secret silences the "no secret" warning; only this process uses it.
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "polyarch-test", "path": str(htpasswd)}}
    return config


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stops a process this helper started: SIGTERM, then SIGKILL after timeout."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _registry_ready(proc: subprocess.Popen[bytes], url: str, want: int, log: Path) -> bool:
    if proc.poll() is not None:
        raise ServiceError(f"registry exited with {proc.returncode}: {log.read_text()[-2000:]}")
    # trust_env=False: a CI proxy setting must never route loopback traffic.
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        return client.get(f"{url}/v2/").status_code == want


@contextmanager
def running_registry(
    workdir: Path,
    *,
    credentials: tuple[str, str] | None = None,
    timeout: float = REGISTRY_READY_TIMEOUT,
    delete: bool = True,
) -> Iterator[Registry]:
    """Runs docker-registry on a free 127.0.0.1 port with storage under workdir.

    Ready means GET /v2/ answers 200 (or 401 with credentials). The process is
    stopped by its PID on exit. A port taken between choosing and binding it is
    retried with another port.
    """
    if not os.access(REGISTRY_BINARY, os.X_OK):
        raise ServiceError(f"{REGISTRY_BINARY} missing: run deploy/dev/bootstrap.sh")
    workdir.mkdir(parents=True, exist_ok=True)
    htpasswd: Path | None = None
    if credentials is not None:
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(htpasswd_entry(*credentials))
    storage = workdir / "storage"
    for attempt in range(5):
        port = free_port()
        config_path = workdir / "config.yml"
        # JSON is YAML; no YAML library needed.
        config_path.write_text(
            json.dumps(_registry_config(storage, port, htpasswd, delete), indent=2)
        )
        log_path = workdir / f"registry-{attempt}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until(
                    partial(_registry_ready, proc, url, 401 if credentials else 200, log_path),
                    timeout=timeout,
                    message=f"registry on {url} ready (log: {log_path})",
                    ignore=(httpx.TransportError,),
                )
            except ServiceError:
                if "address already in use" in log_path.read_text():
                    continue  # lost the port race; try another port
                raise
            yield Registry(
                address=f"127.0.0.1:{port}",
                storage=storage,
                log_path=log_path,
                pid=proc.pid,
                username=credentials[0] if credentials else None,
                password=credentials[1] if credentials else None,
            )
            return
        finally:
            stop_process(proc)
    raise ServiceError("could not bind a registry port after 5 attempts")


def build_base_image(registry_address: str, repo_tag: str | None = None) -> str:
    """Runs deploy/dev/base-image.sh against the registry; returns the pushed reference."""
    return _run_image_script(BASE_IMAGE_SCRIPT, BASE_IMAGE_TIMEOUT, registry_address, repo_tag)


def build_python_base(registry_address: str, repo_tag: str | None = None) -> str:
    """Runs deploy/docker/python-base.sh against the registry; returns the pushed reference."""
    return _run_image_script(PYTHON_BASE_SCRIPT, PYTHON_BASE_TIMEOUT, registry_address, repo_tag)


def build_agent_base(registry_address: str, repo_tag: str | None = None) -> str:
    """Runs deploy/docker/agent-base.sh (the python base with buildah) against the registry."""
    return _run_image_script(AGENT_BASE_SCRIPT, PYTHON_BASE_TIMEOUT, registry_address, repo_tag)


def _run_image_script(
    script: Path, timeout: float, registry_address: str, repo_tag: str | None
) -> str:
    """The scripts' contract: REGISTRY_ADDR [REPO[:TAG]] in, the pushed reference last on stdout."""
    args = ["bash", str(script), registry_address]
    if repo_tag is not None:
        args.append(repo_tag)
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(f"{script} did not finish in {timeout:g}s") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ServiceError(f"{script} failed with exit {done.returncode}:\n{done.stderr[-4000:]}")
    return lines[-1]


def docker_problem(docker: str) -> str | None:
    """None when dockerd answers through this CLI; otherwise what is wrong and how to fix it."""
    if shutil.which(docker) is None:
        return f"{docker} not found: run deploy/dev/bootstrap.sh (or set POLYARCH_DOCKER)"
    try:
        done = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return f"`{docker} info` hung for 30s: is dockerd wedged? (deploy/dev/dockerd.sh status)"
    if done.returncode != 0 or not done.stdout.strip():
        return (
            f"dockerd does not answer `{docker} info` (exit {done.returncode}): "
            f"{done.stderr.strip()[-1000:]}\nstart it with: deploy/dev/dockerd.sh start"
        )
    return None


def skopeo_raw(reference: str, *, creds: tuple[str, str] | None = None) -> dict[str, Any]:
    """What the registry holds at reference, read by skopeo (an independent client)."""
    args = [SKOPEO_BINARY, "inspect", "--raw", "--tls-verify=false"]
    args += ["--creds", f"{creds[0]}:{creds[1]}"] if creds else ["--no-creds"]
    done = subprocess.run(
        [*args, f"docker://{reference}"], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise ServiceError(f"skopeo inspect {reference} failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result

"""A job's own registry credentials and secrets on disk: 0600 files in its 0700 job folder."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyarch.proto.trust import write_private
from polyarch.proto.v1 import agent_pb2


@dataclass(frozen=True)
class JobCredentials:
    """Where a builder finds this job's credentials; everything lives under the job folder,
    which the agent removes when the job ends."""

    docker_config_dir: Path | None = None  # DOCKER_CONFIG for the docker CLI
    auth_file: Path | None = None  # --authfile for buildah
    secrets: Mapping[str, Path] = field(default_factory=dict)  # id -> file


def host_docker_config() -> dict[str, Any]:
    """The host's own docker config.json (credential helpers included), or {}."""
    directory = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    try:
        data = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _auth_entry(username: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}


def write_job_credentials(job_dir: Path, job: agent_pb2.Assignment) -> JobCredentials:
    """Writes the job's secrets and, when it brought registry credentials, a docker config
    and a buildah auth file that put them over the host's own (per-build entries win)."""
    secrets: dict[str, Path] = {}
    if job.secrets:
        folder = job_dir / "secrets"
        folder.mkdir(mode=0o700)
        for secret in job.secrets:
            path = folder / secret.id  # ids were checked at submit: [A-Za-z0-9._-]
            write_private(path, secret.value)
            secrets[secret.id] = path
    if not job.registry_auths:
        return JobCredentials(secrets=secrets)
    own = {a.registry: _auth_entry(a.username, a.password) for a in job.registry_auths}
    host = host_docker_config()
    auths = {**(host.get("auths") or {}), **own}
    helpers = {k: v for k, v in (host.get("credHelpers") or {}).items() if k not in own}
    docker_config = {**host, "auths": auths, "credHelpers": helpers}
    if own and host.get("credsStore"):
        # a store would answer before the per-build entries; the host's helpers stay per host
        docker_config.pop("credsStore")
    config_dir = job_dir / "docker"
    config_dir.mkdir(mode=0o700)
    write_private(config_dir / "config.json", json.dumps(docker_config).encode())
    auth_file = job_dir / "auth.json"
    write_private(auth_file, json.dumps({"auths": auths}).encode())
    return JobCredentials(config_dir, auth_file, secrets)

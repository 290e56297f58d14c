"""The spine under TLS and tokens, into a registry that requires auth, with credentials and a
build secret that only the CLI has: agents' hosts and the coordinator have none."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest

from polyarch.agent.builders.buildah import BuildahBuilder
from polyarch.agent.builders.docker import DockerBuilder
from polyarch.proto.trust import Role
from tests.support.farm import Farm
from tests.support.services import Registry
from tests.support.verify import image_entries, index_platforms

THREE = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
UNAME = {"linux/amd64": "x86_64", "linux/arm64": "aarch64", "linux/arm/v7": "armv7l"}
# The image keeps only the secret's hash: proof it was mounted, without leaking it.
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
DOCKERFILE = """\
ARG BASE=scratch
FROM ${BASE}
# as in BuildKit, a secret's value is not part of the cache key: the nonce is
ARG NONCE=0
RUN --mount=type=secret,id=npm sha256sum /run/secrets/npm | cut -c1-64 > /secret.sha256
RUN uname -m > /arch
"""


def client_docker_config(directory: Path, registry: Registry) -> Path:
    """A docker config.json only the CLI sees (DOCKER_CONFIG), as a CI job's login writes."""
    assert registry.username and registry.password
    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()
    (directory / "config.json").write_text(
        json.dumps({"auths": {registry.address: {"auth": auth}}})
    )
    return directory


def skopeo(*args: str, creds: str) -> str:
    # inspect takes --creds; copy names the side: --src-creds
    prefix = "--src-" if args[0] == "copy" else "--"
    done = subprocess.run(
        ["skopeo", *args, f"{prefix}tls-verify=false", f"{prefix}creds", creds],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.emulated
@pytest.mark.parametrize("backend", ["docker", "buildah"])
async def test_a_secure_build_with_per_build_credentials_and_a_secret(
    farm: Farm, backend: str, docker_binary: str, auth_registry: Registry, base_image: str,
    unique_repo: str, tmp_path: Path,
) -> None:  # fmt: skip
    assert not os.environ.get("DOCKER_CONFIG")
    assert not (Path.home() / ".docker" / "config.json").exists(), "hosts must have no login"
    builder = DockerBuilder(docker_binary) if backend == "docker" else BuildahBuilder()
    await farm.add_agent(f"{backend}-agent", builder, native=["linux/amd64"],
                         emulated=["linux/arm64", "linux/arm/v7"], slots=3)  # fmt: skip
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    secret = "npm-token-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
    ci_token = farm.token(Role.CI)
    config_dir = client_docker_config(tmp_path / "ci-docker", auth_registry)
    repo = f"{auth_registry.address}/{unique_repo}"
    result = await farm.cli(
        "build", "--platform", ",".join(THREE), "-t", f"{repo}:v1", "--token", ci_token,
        "--build-arg", f"BASE={base_image}", "--build-arg", f"NONCE={os.urandom(8).hex()}",
        "--secret", "id=npm,env=NPM_TOKEN", str(context),
        env={"DOCKER_CONFIG": str(config_dir), "NPM_TOKEN": secret},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    index_digest = result.stdout.strip().splitlines()[-1]

    creds = f"{auth_registry.username}:{auth_registry.password}"
    raw = skopeo("inspect", "--raw", f"docker://{repo}:v1", creds=creds)
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == index_digest
    index = json.loads(raw)
    platforms = index_platforms(index)
    assert sorted(platforms) == sorted(THREE)
    want = hashlib.sha256(secret.encode()).hexdigest()
    for platform, digest in platforms.items():
        layout = tmp_path / f"oci-{platform.replace('/', '-')}"
        skopeo("copy", f"docker://{repo}@{digest}", f"oci:{layout}:x", creds=creds)
        assert _file_in_image(layout, "secret.sha256").strip() == want, platform
        assert _file_in_image(layout, "arch").strip() == UNAME[platform], platform

    # the secret, the registry password and the CI token appear nowhere the farm keeps
    data_dir = farm.coordinator.config.data_dir
    with sqlite3.connect(data_dir / "state.sqlite3") as db:
        stored = "\n".join(str(r) for t in ("builds", "jobs", "job_transitions", "tokens")
                           for r in db.execute(f"SELECT * FROM {t}"))  # fmt: skip
    listing = (await farm.cli("builds", "--json")).stdout
    async with httpx.AsyncClient(trust_env=False) as client:
        metrics = (await client.get(f"http://127.0.0.1:{farm.coordinator.metrics_port}/")).text
    assert auth_registry.password is not None
    for value in (secret, auth_registry.password, ci_token.split("_")[3]):
        for where, text in (("database", stored), ("builds --json", listing),
                            ("metrics", metrics), ("CLI output", result.stderr)):  # fmt: skip
            assert value not in text, f"a secret reached the {where}"
    assert not list((farm.work_dir / "agents").glob("*/jobs/*")), "job folders were left"


def _file_in_image(layout: Path, name: str) -> str:
    """A file's text from the top layers of a one-image OCI layout (busybox base: tar+gzip)."""
    import tarfile

    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    for layer in reversed(manifest["layers"]):
        blob = layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
        with tarfile.open(blob) as tar:
            for member in tar.getmembers():
                if member.name.lstrip("./") == name:
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    return extracted.read().decode()
    raise AssertionError(f"{name} is in no layer of {layout}")


async def test_a_second_repository_behind_a_login_gets_the_index_with_the_builds_credentials(
    farm: Farm, docker_binary: str, registry: Registry, auth_registry: Registry,
    base_image: str, unique_repo: str, tmp_path: Path,
) -> None:  # fmt: skip
    """The agents push to the first tag's (anonymous) registry; the coordinator copies the
    images and the index into the registry that needs a login, with the credentials the
    build brought from the CI's docker config (its host has none)."""
    await farm.add_agent("docker-agent", DockerBuilder(docker_binary), native=["linux/amd64"])
    config_dir = client_docker_config(tmp_path / "ci-docker", auth_registry)
    first = f"{registry.address}/{unique_repo}"
    guarded = f"{auth_registry.address}/{unique_repo}-mirror"
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{first}:v1", "-t", f"{guarded}:v1",
        "--build-arg", f"BASE={base_image}", "--build-arg", f"NONCE={os.urandom(8).hex()}",
        str(EXAMPLE), env={"DOCKER_CONFIG": str(config_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    creds = f"{auth_registry.username}:{auth_registry.password}"
    copied = skopeo("inspect", "--raw", f"docker://{guarded}:v1", creds=creds)
    assert "sha256:" + hashlib.sha256(copied.encode()).hexdigest() == result.stdout.split()[-1]
    (child,) = image_entries(json.loads(copied))  # the attestation follows it
    image = json.loads(skopeo("inspect", "--raw", f"docker://{guarded}@{child['digest']}",
                              creds=creds))  # fmt: skip
    assert image["layers"] and image["config"]["digest"]

"""The docker (BuildKit) and buildah backends against a real registry, dockerd and QEMU."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from polyarch.agent.builders.base import (
    Builder,
    BuilderUnavailable,
    BuildFailed,
    BuildRequest,
)
from polyarch.agent.builders.buildah import BuildahBuilder
from polyarch.agent.builders.docker import DockerBuilder
from polyarch.proto.media_types import DOCKER_MANIFEST, OCI_MANIFEST
from polyarch.proto.platforms import parse_platform
from tests.support.services import Registry

DOCKER_20 = "/usr/bin/docker"  # drives dockerd's embedded BuildKit without buildx
DOCKER_28 = "/usr/local/bin/docker"  # no buildx plugin on the test machine
UNAME = {"linux/amd64": "x86_64", "linux/arm64": "aarch64", "linux/arm/v7": "armv7l"}


def run(*argv: str, timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


@pytest.fixture(scope="session")
def builders_registry(registry: Registry) -> str:
    """The shared session registry's address."""
    return registry.address


@pytest.fixture(scope="session")
def builders_base(base_image: str) -> str:
    """The shared offline multi-arch busybox base (linux/amd64, arm64, arm/v7)."""
    return base_image


def unique_image(registry: str, label: str) -> str:
    return f"{registry}/polyarch-builders/{label}-{secrets.token_hex(4)}:job-1"


def make_builder(kind: str) -> Builder:
    # buildah: each finished job's image is removed at once (an agent waits for a batch)
    return DockerBuilder(DOCKER_20) if kind == "docker" else BuildahBuilder(removal_batch=1)


def write_context(root: Path, dockerfile: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(dockerfile)
    return root


def skopeo_raw(reference: str) -> bytes:
    done = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reference}"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def local_tag_exists(kind: str, image: str) -> bool:
    argv = (
        [DOCKER_20, "image", "inspect", image]
        if kind == "docker"
        else ["buildah", "inspect", "--type", "image", image]
    )
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


BACKENDS = ["docker", "buildah"]
PLATFORMS = [
    pytest.param("linux/amd64", id="amd64"),
    pytest.param("linux/arm64", id="arm64", marks=pytest.mark.emulated),
    pytest.param("linux/arm/v7", id="arm-v7", marks=pytest.mark.emulated),
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("kind", BACKENDS)
async def test_build_push_and_verify(
    kind: str, platform: str, builders_base: str, builders_registry: str, tmp_path: Path
) -> None:
    context = write_context(tmp_path / "ctx", f"FROM {builders_base}\nRUN uname -m > /arch\n")
    image = unique_image(builders_registry, f"{kind}-{platform.replace('/', '-')}")
    request = BuildRequest(
        context_dir=context, dockerfile="Dockerfile", platform=parse_platform(platform),
        image=image, labels={"org.polyarch.test": kind}, insecure_registry=True,
    )  # fmt: skip
    lines: list[str] = []
    builder = make_builder(kind)
    pushed = await builder.build_and_push(request, lines.append)
    await builder.idle()  # the tag's removal runs in the background once no build runs

    assert any("uname -m > /arch" in line for line in lines), lines
    repository = image.rsplit(":", 1)[0]
    by_digest = f"{repository}@{pushed.digest}"
    raw = skopeo_raw(by_digest)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == pushed.digest
    manifest = json.loads(raw)
    expected_type = DOCKER_MANIFEST if kind == "docker" else OCI_MANIFEST
    assert pushed.media_type == manifest["mediaType"] == expected_type
    if kind == "docker":
        assert pushed.size == len(raw)
    assert skopeo_raw(image) == raw  # the per-job tag points at the same manifest
    config = json.loads(
        run("skopeo", "inspect", "--config", "--tls-verify=false", f"docker://{by_digest}")
    )
    expected = parse_platform(platform)
    assert (config["os"], config["architecture"]) == (expected.os, expected.architecture)
    assert config.get("variant", "") == expected.variant
    assert config["config"]["Labels"]["org.polyarch.test"] == kind
    assert not local_tag_exists(kind, image), "the per-job tag was left behind"

    output = await asyncio.to_thread(
        run, DOCKER_20, "run", "--rm", "--platform", platform, by_digest, "cat", "/arch"
    )
    await asyncio.to_thread(run, DOCKER_20, "rmi", by_digest)
    assert output.strip() == UNAME[platform]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_failing_step_is_named(
    kind: str, builders_base: str, builders_registry: str, tmp_path: Path
) -> None:
    context = write_context(
        tmp_path / "ctx",
        f"FROM {builders_base}\nRUN echo fine\nRUN echo boom && exit 7\nRUN echo never\n",
    )
    request = BuildRequest(
        context_dir=context, dockerfile="Dockerfile", platform=parse_platform("linux/amd64"),
        image=unique_image(builders_registry, f"{kind}-fails"), insecure_registry=True,
    )  # fmt: skip
    lines: list[str] = []
    with pytest.raises(BuildFailed) as caught:
        await make_builder(kind).build_and_push(request, lines.append)
    assert caught.value.step == "[3/4] RUN echo boom && exit 7", lines
    assert "7" in caught.value.message
    assert caught.value.infrastructure is False
    assert "boom" in "\n".join(lines)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_missing_dockerfile(kind: str, builders_registry: str, tmp_path: Path) -> None:
    request = BuildRequest(
        context_dir=tmp_path, dockerfile="build/Dockerfile.nope",
        platform=parse_platform("linux/amd64"), image=unique_image(builders_registry, "none"),
    )  # fmt: skip
    with pytest.raises(BuildFailed) as caught:
        await make_builder(kind).build_and_push(request, lambda line: None)
    assert caught.value.step == "prepare"
    assert "'build/Dockerfile.nope' not found in the build context" in caught.value.message


def pid_running(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line contains marker (read from /proc; nothing is signalled)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker in cmdline and pid_running(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("kind", BACKENDS)
async def test_cancel_stops_the_build(
    kind: str, builders_base: str, builders_registry: str, tmp_path: Path
) -> None:
    marker = f"polyarch-cancel-{secrets.token_hex(6)}"
    # Not `... && sleep 60` alone: sh would exec the last command and lose the marker.
    step = f"echo {marker} && sleep 60 && echo {marker}-done"
    context = write_context(tmp_path / "ctx", f"FROM {builders_base}\nRUN {step}\n")
    image = unique_image(builders_registry, f"{kind}-cancel")
    request = BuildRequest(
        context_dir=context, dockerfile="Dockerfile", platform=parse_platform("linux/amd64"),
        image=image, insecure_registry=True,
    )  # fmt: skip
    lines: list[str] = []
    task = asyncio.create_task(make_builder(kind).build_and_push(request, lines.append))
    deadline = time.monotonic() + 90
    # The step's own line must arrive while it runs: output is streamed, not collected.
    while (
        not (tool := processes_mentioning(image))
        or not processes_mentioning(step)
        or not any(marker in line for line in lines)
    ):
        assert not task.done(), lines
        assert time.monotonic() < deadline, f"the sleep step never started: {lines[-5:]}"
        await asyncio.sleep(0.1)

    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    while processes_mentioning(image) or processes_mentioning(step):
        assert time.monotonic() - cancelled_at < 10, "builder or build step outlived the cancel"
        await asyncio.sleep(0.05)
    assert not [pid for pid in tool if pid_running(pid)], "the builder process is still running"


async def test_docker_client_without_buildx_is_refused() -> None:
    with pytest.raises(BuilderUnavailable) as caught:
        await DockerBuilder(DOCKER_28).check()
    assert "buildx" in str(caught.value)
    assert DOCKER_28 in str(caught.value)


async def test_usable_builders_pass_check() -> None:
    await DockerBuilder(DOCKER_20).check()
    await BuildahBuilder().check()


async def test_missing_binaries_are_unavailable() -> None:
    with pytest.raises(BuilderUnavailable, match="cannot run"):
        await DockerBuilder("/nonexistent/docker").check()
    with pytest.raises(BuilderUnavailable, match="apt-get install -y buildah"):
        await BuildahBuilder("/nonexistent/buildah").check()


async def test_unreachable_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    with pytest.raises(BuilderUnavailable, match="unreachable"):
        await DockerBuilder(DOCKER_20).check()

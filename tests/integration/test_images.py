"""The farm builds images of polyarch itself (deploy/docker/) from the offline Python base."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from polyarch.agent.builders.docker import DockerBuilder
from polyarch.ops.wheelhouse import WheelTarget, build_wheelhouse
from polyarch.proto.registries import polyarch_version
from tests.support.farm import Farm
from tests.support.verify import docker_run, index_platforms, skopeo_raw

DOCKER_DIR = Path(__file__).resolve().parents[2] / "deploy" / "docker"
PLATFORMS = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}
# Compressed, per platform: the base is about 46 MB and the venv about 15 MB. A guard against
# a wheel or a pip cache landing in a layer, not a target.
MAX_IMAGE_BYTES = 100_000_000


async def image_context(directory: Path) -> Path:
    """What the CLI image builds from: wheels/ for both arches side by side (pip picks each
    platform's wheels by their tags inside that platform's build)."""
    for arch in ("amd64", "arm64"):
        target = WheelTarget.parse("3.11", arch)
        await asyncio.to_thread(build_wheelhouse, directory / "wheels", target)
    return directory


@pytest.mark.emulated
@pytest.mark.timeout(900)  # a cold python base runs arm64 package scripts under QEMU
async def test_the_farm_builds_an_image_of_its_own_cli_that_runs_on_amd64_and_arm64(
    farm: Farm, docker_binary: str, registry, python_base_image: str, unique_repo: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    context = await image_context(tmp_path / "context")
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    reference = f"{registry.address}/{unique_repo}:v1"
    result = await farm.cli(
        "build", "--platform", ",".join(PLATFORMS), "-t", reference,
        "-f", str(DOCKER_DIR / "cli.Dockerfile"), "--build-arg", f"BASE={python_base_image}",
        str(context),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    # Read back by independent clients: skopeo for the index, docker for each platform.
    index = skopeo_raw(reference)
    children = index_platforms(index)
    assert sorted(children) == sorted(PLATFORMS)
    for child in children.values():
        manifest = skopeo_raw(f"{registry.address}/{unique_repo}@{child}")
        assert sum(layer["size"] for layer in manifest["layers"]) < MAX_IMAGE_BYTES
    pulled: list[str] = []
    try:
        for platform, machine in PLATFORMS.items():
            version = docker_run(docker_binary, reference, platform, "--version")
            assert version == f"polyarch {polyarch_version()}"
            # grpc's compiled core loads: pip took this platform's wheels, not the other's.
            probe = "import platform, grpc._cython.cygrpc; print(platform.machine())"
            python = "/opt/polyarch/bin/python"
            ran = docker_run(docker_binary, reference, platform, "-c", probe, entrypoint=python)
            assert ran == machine
            pulled.append(image_id(docker_binary, reference))
    finally:
        # The pulls are the test's own (the tag moves to each platform's image in turn, so
        # remove them by id): leave dockerd's image store as it was.
        await asyncio.to_thread(remove_images, docker_binary, [*pulled, reference])


def remove_images(docker: str, references: list[str]) -> None:
    subprocess.run([docker, "rmi", *references], capture_output=True, timeout=60)


def image_id(docker: str, reference: str) -> str:
    done = subprocess.run([docker, "image", "inspect", "--format", "{{.Id}}", reference],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return done.stdout.strip()

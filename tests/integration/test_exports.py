"""buildx's file outputs through the farm: OCI layouts, root filesystems, Docker archives and
--load, each checked with an independent client (skopeo, tar, docker load/run, ELF headers)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from polyarch.agent.builders.buildah import BuildahBuilder
from polyarch.agent.builders.docker import DockerBuilder
from tests.support.farm import Farm
from tests.support.verify import index_platforms

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
# ELF e_machine of each architecture: what the binary really is, read from its header
ELF_MACHINE = {"amd64": 62, "arm64": 183, "arm": 40}

pytestmark = pytest.mark.emulated


def elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF binary"
    return int.from_bytes(header[18:20], "little")


def run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"
    return done.stdout


def remove_images(docker: str, *names: str) -> None:
    subprocess.run([docker, "rmi", "-f", *names], capture_output=True, timeout=60)


def scratch_on(farm: Farm, registry) -> str:
    """Where this farm's untagged builds push (--scratch-repository)."""
    manager = farm.coordinator.manager
    assert manager is not None
    manager.scratch_repository = f"{registry.address}/polyarch-scratch"
    return manager.scratch_repository


async def test_oci_tar_and_local_outputs_of_two_platforms_need_no_tag(
    farm: Farm, docker_binary: str, registry, base_image: str, tmp_path: Path
) -> None:
    scratch_on(farm, registry)
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    oci, rootfs, local = tmp_path / "image.oci.tar", tmp_path / "rootfs.tar", tmp_path / "out"
    metadata = tmp_path / "metadata.json"
    result = await farm.cli(
        "build", "--platform", "linux/amd64,linux/arm64", "--build-arg", f"BASE={base_image}",
        "-o", f"type=oci,dest={oci}", "-o", f"type=tar,dest={rootfs}",
        "-o", f"type=local,dest={local}", "--metadata-file", str(metadata), str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"written to {oci}" in result.stderr and f"unpacked in {local}" in result.stderr
    built = {
        p: r["digest"] for p, r in json.loads(metadata.read_text())["polyarch.platforms"].items()
    }
    index_digest = result.stdout.split()[-1]

    # OCI layout: skopeo reads the index and each image straight from the tarball
    names = run("tar", "-tf", str(oci)).split()
    assert {"oci-layout", "index.json", f"blobs/sha256/{index_digest.split(':')[1]}"} <= set(names)
    index = json.loads(run("skopeo", "inspect", "--raw", f"oci-archive:{oci}"))
    assert index_platforms(index) == built
    arm = json.loads(run("skopeo", "inspect", "--override-arch", "arm64", f"oci-archive:{oci}"))
    assert arm["Architecture"] == "arm64" and arm["Digest"] == index_digest

    # type=tar: one folder per platform, as buildx lays out several platforms (GNU tar reads it)
    listing = run("tar", "-tvf", str(rootfs)).splitlines()
    for arch, machine in (("amd64", "x86_64"), ("arm64", "aarch64")):
        built_for = run("tar", "-xOf", str(rootfs), f"linux_{arch}/built-for").strip()
        assert built_for == f"built for linux/{arch} on {machine}"
        busybox = [line for line in listing if line.endswith(f" linux_{arch}/bin/busybox")]
        assert len(busybox) == 1 and busybox[0].startswith("-rwx")  # a regular file

    # type=local: the same trees unpacked, binaries of each architecture
    for arch in ("amd64", "arm64"):
        tree = local / f"linux_{arch}"
        assert elf_machine(tree / "bin" / "busybox") == ELF_MACHINE[arch]
        assert (tree / "greeting.txt").read_text() == (EXAMPLE / "greeting.txt").read_text()
        # a symlink keeps its target as the image has it, even an absolute one
        assert os.readlink(tree / "bin" / "sh") == "/bin/busybox"


async def test_load_and_a_docker_archive_reach_docker_as_runnable_images(
    farm: Farm, docker_binary: str, registry, base_image: str, tmp_path: Path
) -> None:
    """--load takes the Docker Engine's platform of a two-platform build; type=docker,dest
    of a single arm64 build is loaded with `docker load -i` and run under QEMU."""
    scratch_on(farm, registry)
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    name = f"polyarch-load-{secrets.token_hex(4)}"
    archive = tmp_path / "arm64.docker.tar"
    try:
        result = await farm.cli(
            "build", "--platform", "linux/amd64,linux/arm64", "--load", "-t", f"{name}:ci",
            "--iidfile", str(tmp_path / "iid"), "--build-arg", f"BASE={base_image}", str(EXAMPLE),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"--load: Loaded image: {name}:ci" in result.stderr
        inspected = json.loads(run(docker_binary, "image", "inspect", f"{name}:ci"))[0]
        assert inspected["Architecture"] == "amd64"
        assert (tmp_path / "iid").read_text() == inspected["Id"]  # the image ID, as buildx
        assert run(docker_binary, "run", "--rm", f"{name}:ci").strip() == "x86_64"

        result = await farm.cli(
            "build", "--platform", "linux/arm64", "-o", f"type=docker,dest={archive}",
            "-t", f"{name}:arm64", "--build-arg", f"BASE={base_image}", str(EXAMPLE),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"Loaded image: {name}:arm64" in run(docker_binary, "load", "-i", str(archive))
        inspected = json.loads(run(docker_binary, "image", "inspect", f"{name}:arm64"))[0]
        assert inspected["Architecture"] == "arm64"
        uname = run(docker_binary, "run", "--rm", "--platform", "linux/arm64", f"{name}:arm64")
        assert uname.strip() == "aarch64"
    finally:
        remove_images(docker_binary, f"{name}:ci", f"{name}:arm64")


async def test_a_buildah_build_s_deletions_are_absent_from_its_root_filesystem(
    farm: Farm, registry, base_image: str, tmp_path: Path
) -> None:
    """Whiteouts from a real builder: a file of the base removed, a folder emptied and
    refilled in a later layer; the exported tree shows the final state only."""
    scratch_on(farm, registry)
    await farm.add_agent("buildah-1", BuildahBuilder(), native=["linux/amd64"])
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        "RUN mkdir -p /data && echo old > /data/old && echo keep > /data/keep\n"
        "RUN rm /bin/ls /data/old && echo new > /data/new\n"
        "RUN rm -rf /data && mkdir /data && echo fresh > /data/fresh\n"
    )
    out = tmp_path / "out"
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-o", f"type=local,dest={out}", str(context)
    )
    assert result.returncode == 0, result.stderr
    assert not (out / "bin" / "ls").is_symlink() and (out / "bin" / "cat").is_symlink()
    assert sorted(p.name for p in (out / "data").iterdir()) == ["fresh"]
    assert elf_machine(out / "bin" / "busybox") == ELF_MACHINE["amd64"]


async def test_outputs_that_cannot_work_are_refused_before_any_build(
    farm: Farm, registry, base_image: str, tmp_path: Path
) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    cases = [
        (["-o", "type=oci"], "type=oci needs dest=FILE"),
        (["-o", f"type=local,dest={tmp_path / 'full'}"], "must be an empty or new folder"),
        (["--platform", "linux/arm64,linux/arm/v7", "--load"], "none is the local one"),
        ([], "no tag given: pushing needs -t"),
    ]
    for flags, says in cases:
        platform = [] if "--platform" in flags else ["--platform", "linux/amd64"]
        result = await farm.cli("build", *platform, *flags, str(EXAMPLE))
        assert result.returncode == 2, result.stderr
        assert says in result.stderr
    # --load goes to the Docker Engine DOCKER_HOST names: one that is not there is refused
    gone = f"unix://{tmp_path / 'no-docker.sock'}"
    result = await farm.cli("build", "--platform", "linux/amd64", "--load", str(EXAMPLE),
                            env={"DOCKER_HOST": gone})  # fmt: skip
    assert result.returncode == 2 and "--load: no Docker Engine to load into" in result.stderr
    assert (tmp_path / "full" / "x").read_text() == "mine"
    assert not await farm.coordinator.manager.list_page(10, None)  # type: ignore[union-attr]

"""Incremental contexts on real builders: the same image as the tar path, only changes sent."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from polyarch.client.api import BuildClient
from polyarch.client.context import pack_context
from polyarch.proto.v1 import common_pb2
from tests.support.farm import Farm, builder_named
from tests.support.verify import docker_run, skopeo_raw

MTIME = 1_700_000_000
LISTING = 'cd /ctx && find . | sort | while read -r f; do stat -c "%n|%F|%a|%s|%Y|%N" "$f"; done'


def make_tree(root: Path) -> Path:
    """A context with every kind of object a context may hold, and fixed mtimes."""
    files = {
        "Dockerfile": "ARG BASE\nFROM ${BASE}\nCOPY . /ctx\n",
        ".dockerignore": "*.log\n!keep.log\nnode_modules\n",
        "bin/run.sh": "#!/bin/sh\necho run\n",
        "secret.conf": "token=not-a-real-one\n",
        "private/notes.txt": "private\n",
        "ro/inside.txt": "read-only dir\n",
        "same-a.txt": "same content\n",
        "same-b.txt": "same content\n",
        "debug.log": "ignored\n",
        "keep.log": "kept by an exception\n",
        "node_modules/pkg/index.js": "ignored\n",
        "big.bin": "",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "big.bin").write_bytes(os.urandom(3 << 20))  # several 1 MiB chunks
    (root / "empty").mkdir()
    os.symlink("bin/run.sh", root / "link-to-file")
    os.symlink("private", root / "link-to-dir")
    os.symlink("does-not-exist", root / "dangling")
    modes = {"bin/run.sh": 0o755, "secret.conf": 0o600, "private": 0o700, "same-b.txt": 0o640}
    for name, mode in modes.items():
        os.chmod(root / name, mode)
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    os.chmod(root / "ro", 0o555)
    os.utime(root / "ro", (MTIME, MTIME))
    return root


def last_layer(reference: str) -> str:
    """The digest of the image's last layer (the COPY), as the registry holds it."""
    manifest = json.loads(skopeo_raw(reference))
    return str(manifest["layers"][-1]["digest"])


def platform_image(index_reference: str, platform: str) -> str:
    """The image of `platform` in the index at `index_reference`, by digest."""
    index = json.loads(skopeo_raw(index_reference))
    os_, arch = platform.split("/")[:2]
    entry = next(
        m for m in index["manifests"]
        if m.get("platform", {}).get("os") == os_ and m["platform"]["architecture"] == arch
    )  # fmt: skip
    return f"{index_reference.rsplit(':', 1)[0]}@{entry['digest']}"


async def build_from_tar(farm: Farm, context: Path, tag: str, base: str) -> str:
    """Builds `context` the old way (one tar, uploaded whole) through the API; the index."""
    packed = pack_context(context)
    try:
        async with BuildClient(farm.address, credentials=farm.credentials()) as client:
            await client.upload_context(packed)
            submitted = await client.submit(
                context_digest=packed.digest, dockerfile=packed.dockerfile,
                platforms=["linux/amd64"], tags=[tag], build_args={"BASE": base}, no_cache=True,
            )  # fmt: skip
            build = await client.follow(submitted.build.id, lambda _event: None)
    finally:
        packed.discard()
    assert build.state == common_pb2.BUILD_STATE_SUCCEEDED, build.error
    return tag


def coordinator_received(farm: Farm) -> float:
    manager = farm.coordinator.manager
    assert manager is not None
    value = manager.metrics.registry.get_sample_value("polyarch_context_bytes_received_total")
    return value or 0.0


def agent_fetched(farm: Farm, name: str) -> float:
    agent = farm.agents[name][0]
    value = agent.metrics.registry.get_sample_value("polyarch_agent_context_bytes_fetched_total")
    return value or 0.0


@pytest.mark.parametrize("backend", ["docker", "buildah"])
async def test_whole_and_incremental_contexts_build_the_same_layer(
    farm: Farm, backend: str, docker_binary: str, registry, base_image: str, unique_repo: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    await farm.add_agent("agent", builder_named(backend, docker_binary), native=["linux/amd64"])
    context = make_tree(tmp_path / "ctx")
    repo = f"{registry.address}/{unique_repo}"
    whole = await build_from_tar(farm, context, f"{repo}:whole", base_image)

    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{repo}:incremental", "--no-cache",
        "--progress", "plain", "--build-arg", f"BASE={base_image}", str(context),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "context: 13 files" in result.stderr, result.stderr  # the manifest path, not a tar
    incremental = f"{repo}:incremental"

    # the COPY layer is byte for byte the same: same paths, modes, mtimes, links and contents
    whole_image = platform_image(whole, "linux/amd64")
    incremental_image = platform_image(incremental, "linux/amd64")
    assert last_layer(whole_image) == last_layer(incremental_image)

    # and what the builder saw is what the user has, read back by docker run
    listing = docker_run(docker_binary, incremental, "linux/amd64", "sh", "-c", LISTING)
    rows = {row.split("|")[0]: row.split("|")[1:] for row in listing.splitlines()}
    assert rows["./bin/run.sh"][:2] == ["regular file", "755"]
    assert rows["./secret.conf"][:2] == ["regular file", "600"]
    assert rows["./same-b.txt"][:2] == ["regular file", "640"]
    assert rows["./private"][:2] == ["directory", "700"]
    assert rows["./ro"][:2] == ["directory", "555"]
    assert rows["./empty"][0] == "directory"
    assert rows["./big.bin"][2] == str(3 << 20)
    assert rows["./bin/run.sh"][3] == str(MTIME)
    assert rows["./link-to-file"][0] == "symbolic link"
    assert rows["./link-to-file"][4].endswith("-> 'bin/run.sh'")
    assert rows["./link-to-dir"][4].endswith("-> 'private'")
    assert rows["./dangling"][4].endswith("-> 'does-not-exist'")
    assert "./keep.log" in rows
    assert not {"./debug.log", "./node_modules"} & set(rows)


async def test_a_changed_file_is_all_that_travels(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("agent", builder_named("buildah", docker_binary), native=["linux/amd64"])
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("ARG BASE\nFROM ${BASE}\nCOPY data /data\n")
    for n in range(20):
        (context / "data").mkdir(exist_ok=True)
        (context / "data" / f"part-{n:02}").write_bytes(os.urandom(512 << 10))
    tag = f"{registry.address}/{unique_repo}:v"

    async def build() -> str:
        result = await farm.cli(
            "build", "--platform", "linux/amd64", "-t", tag, "--progress", "plain",
            "--build-arg", f"BASE={base_image}", str(context),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stderr

    await build()
    received, fetched = coordinator_received(farm), agent_fetched(farm, "agent")
    assert received >= 20 * (512 << 10) and fetched >= 20 * (512 << 10)

    changed = os.urandom(512 << 10)
    (context / "data" / "part-07").write_bytes(changed)
    log = await build()
    assert "sending 1 file" in log, log
    sent = coordinator_received(farm) - received
    pulled = agent_fetched(farm, "agent") - fetched
    # the changed file and the manifest (a few kB), nothing else, up and down
    assert (512 << 10) <= sent < (512 << 10) + (64 << 10), sent
    assert (512 << 10) <= pulled < (512 << 10) + (64 << 10), pulled
    image = platform_image(tag, "linux/amd64")
    digest = docker_run(docker_binary, image, "linux/amd64", "sha256sum", "/data/part-07")
    assert digest.split()[0] == hashlib.sha256(changed).hexdigest()

    received, fetched = coordinator_received(farm), agent_fetched(farm, "agent")
    log = await build()
    assert "already on the coordinator" in log, log
    assert coordinator_received(farm) == received
    assert agent_fetched(farm, "agent") == fetched

"""Incremental contexts on real builders: the same image as the tar path, only changes sent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from polyarch.client.api import BuildClient, PolyarchError
from polyarch.client.context import pack_context
from polyarch.client.context_manifest import build_manifest
from polyarch.client.context_upload import send_context
from polyarch.client.file_hashes import FileHashes
from polyarch.proto.v1 import build_pb2, common_pb2
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


def copied_files(reference: str, work: Path) -> dict[str, tuple[object, ...]]:
    """Every member of the image's last layer (the COPY), read with skopeo and tarfile: type,
    mode, size, link target, content digest, and the mtime of all but directories (both
    builders stamp a directory they write into with the copy's time)."""
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{reference}", f"dir:{work}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    layer = json.loads((work / "manifest.json").read_text())["layers"][-1]["digest"]
    members = {}
    with tarfile.open(work / layer.removeprefix("sha256:")) as archive:
        for member in archive:
            data = archive.extractfile(member) if member.isfile() else None
            content = hashlib.sha256(data.read()).hexdigest() if data else ""
            mtime = None if member.isdir() else member.mtime
            members[member.name] = (member.type, member.mode, member.size, member.linkname,
                                    content, mtime)  # fmt: skip
    return members


def platform_image(index_reference: str, platform: str) -> str:
    """The image of `platform` in the index at `index_reference`, by digest."""
    index = skopeo_raw(index_reference)
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
    # the manifest path, not a tar: 10 files, 9 distinct contents (same-a and same-b)
    assert "context: 10 files, 3.1 MB; sending 9 files" in result.stderr, result.stderr
    incremental = f"{repo}:incremental"

    # the COPY layers hold the same paths, modes, mtimes, links and contents
    whole_files = copied_files(platform_image(whole, "linux/amd64"), tmp_path / "whole")
    incremental_files = copied_files(platform_image(incremental, "linux/amd64"), tmp_path / "incr")
    assert len(whole_files) == 18
    assert whole_files == incremental_files

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


async def test_a_tampered_blob_is_refused_by_the_coordinator_and_by_the_agent(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("agent", builder_named("buildah", docker_binary), native=["linux/amd64"])
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("ARG BASE\nFROM ${BASE}\nCOPY payload /payload\n")
    (context / "payload").write_bytes(b"the real payload\n" * 1000)
    manifest = build_manifest(context, hashes=FileHashes(tmp_path / "hashes"))
    payload = next(e for e in manifest.manifest.entries if e.path == "payload")

    async def blob_messages(data: bytes) -> AsyncIterator[build_pb2.UploadBlobsChunk]:
        yield build_pb2.UploadBlobsChunk(
            context_digest=manifest.digest,
            blob=common_pb2.BlobChunk(digest=payload.digest, size=len(data), data=data),
        )

    async with BuildClient(farm.address, credentials=farm.credentials()) as client:
        await client.upload_manifest(manifest.digest, manifest.manifest.encode())
        forged = bytearray((context / "payload").read_bytes())
        forged[0] ^= 1  # one bit: same size, another digest
        with pytest.raises(PolyarchError) as refused:
            await client.upload_blobs(blob_messages(bytes(forged)))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert payload.digest in str(refused.value)
        missing = await client.missing_blobs(manifest.digest)
        assert payload.digest in {blob.digest for blob in missing}
        assert not (await client.stat_context(manifest.digest)).present

        # the real bytes complete it; then the coordinator's copy rots on its disk
        sent = await send_context(client, manifest)
        assert (await client.stat_context(sent.digest)).present
    contexts = farm.coordinator.manager.contexts  # type: ignore[union-attr]
    stored = contexts.blobs.path_for(payload.digest)
    stored.write_bytes(b"bit rot" + stored.read_bytes()[7:])

    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{registry.address}/{unique_repo}:rot",
        "--progress", "plain", "--build-arg", f"BASE={base_image}", str(context),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "fetch context" in result.stderr and payload.digest in result.stderr, result.stderr
    agent_blobs = farm.work_dir / "agents" / "agent"
    cached = [p.name for p in agent_blobs.rglob(payload.digest.removeprefix("sha256:") + "*")]
    assert cached == [], cached  # nothing unverified was kept


class CuttingProxy:
    """A TCP proxy to `upstream` that cuts the first connection to send more than `cut_after`
    bytes upstream (a network that drops mid-upload); all else passes untouched."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.cuts = 0
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        host, port = self.upstream.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, cut: bool) -> None:
            passed = 0
            while data := await src.read(1 << 16):
                if cut and not self.cuts and passed + len(data) > self.cut_after:
                    self.cuts += 1
                    break
                passed += len(data)
                dst.write(data)
                await dst.drain()

        up = asyncio.create_task(pump(reader, up_writer, True))
        down = asyncio.create_task(pump(up_reader, writer, False))
        with contextlib.suppress(ConnectionError):
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for w in (writer, up_writer):
            w.transport.abort()


async def test_an_interrupted_upload_resumes_where_it_stopped(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("agent", builder_named("buildah", docker_binary), native=["linux/amd64"])
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("ARG BASE\nFROM ${BASE}\nCOPY big /big\n")
    big = os.urandom(40 << 20)
    (context / "big").write_bytes(big)
    received = coordinator_received(farm)
    async with CuttingProxy(farm.address, cut_after=16 << 20) as proxy:
        result = await farm.cli(
            "build", "--coordinator", proxy.address, "--platform", "linux/amd64",
            "-t", f"{registry.address}/{unique_repo}:big", "--progress", "plain",
            "--build-arg", f"BASE={base_image}", str(context),
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert proxy.cuts == 1 and proxy.connections >= 2
    assert "context upload interrupted" in result.stderr, result.stderr
    uploaded = coordinator_received(farm) - received
    # the blob went up once: what arrived before the cut was kept, the rest followed
    assert (40 << 20) <= uploaded < (40 << 20) + (2 << 20), uploaded
    image = platform_image(f"{registry.address}/{unique_repo}:big", "linux/amd64")
    copied = docker_run(docker_binary, image, "linux/amd64", "sha256sum", "/big")
    assert copied.split()[0] == hashlib.sha256(big).hexdigest()


@pytest.mark.emulated
async def test_two_agents_with_different_caches_both_build_it(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("warm", builder_named("buildah", docker_binary), native=["linux/amd64"])
    context = tmp_path / "ctx"
    (context / "src").mkdir(parents=True)
    (context / "Dockerfile").write_text("ARG BASE\nFROM ${BASE}\nCOPY src /src\n")
    for n in range(8):
        (context / "src" / f"{n}.bin").write_bytes(os.urandom(256 << 10))
    tag = f"{registry.address}/{unique_repo}:v"

    async def build(platforms: str) -> None:
        result = await farm.cli(
            "build", "--platform", platforms, "-t", tag, "--progress", "plain",
            "--build-arg", f"BASE={base_image}", str(context),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    await build("linux/amd64")  # only "warm" holds these blobs now
    await farm.add_agent("cold", builder_named("docker", docker_binary), native=["linux/arm64"])
    changed = os.urandom(256 << 10)
    (context / "src" / "3.bin").write_bytes(changed)
    (context / "src" / "new.bin").write_bytes(b"new file\n")
    warm_before = agent_fetched(farm, "warm")
    await build("linux/amd64,linux/arm64")

    # the warm agent fetched only the two new contents; the cold one everything
    warm_fetched = agent_fetched(farm, "warm") - warm_before
    assert (256 << 10) <= warm_fetched < (256 << 10) + (64 << 10), warm_fetched
    assert agent_fetched(farm, "cold") >= 8 * (256 << 10)
    expected = hashlib.sha256(changed).hexdigest()
    listing = "sha256sum /src/3.bin /src/0.bin && cat /src/new.bin"
    for platform in ("linux/amd64", "linux/arm64"):
        out = docker_run(
            docker_binary, platform_image(tag, platform), platform, "sh", "-c", listing
        )
        lines = out.splitlines()
        assert lines[0].split()[0] == expected, (platform, out)
        assert (
            lines[1].split()[0]
            == hashlib.sha256((context / "src" / "0.bin").read_bytes()).hexdigest()
        )
        assert lines[2] == "new file"


async def test_a_build_writing_into_its_context_cannot_change_the_agents_cache(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    """buildah 1.28 bind-mounts the context folder itself for RUN --mount, so `rw` writes
    land in the job's files: those must be copies, never links into the agent's cache."""
    await farm.add_agent("agent", builder_named("buildah", docker_binary), native=["linux/amd64"])
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "data.txt").write_text("original\n")
    (context / "Dockerfile").write_text("ARG BASE\nFROM ${BASE}\nCOPY data.txt /data.txt\n")
    (context / "Dockerfile.rw").write_text(
        "ARG BASE\nFROM ${BASE}\n"
        "RUN --mount=type=bind,target=/ctx,rw sh -c 'echo pwned > /ctx/data.txt'\n"
    )
    tag = f"{registry.address}/{unique_repo}"

    async def build(name: str, *flags: str) -> None:
        result = await farm.cli(
            "build", "--platform", "linux/amd64", "-t", f"{tag}:{name}", "--progress", "plain",
            "--build-arg", f"BASE={base_image}", *flags, str(context),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    await build("first")  # data.txt linked from the cache
    await build("writer", "-f", str(context / "Dockerfile.rw"))  # and now written to
    await build("again", "--no-cache")
    copied = docker_run(docker_binary, f"{tag}:again", "linux/amd64", "cat", "/data.txt")
    assert copied.strip() == "original"
    blobs = farm.work_dir / "agents" / "agent"
    for cached in [*blobs.rglob("blobs/*"), *blobs.rglob("variants/*")]:
        if cached.is_file() and "." not in cached.name:
            digest = hashlib.sha256(cached.read_bytes()).hexdigest()
            assert cached.name.startswith(digest), f"{cached} no longer holds its content"

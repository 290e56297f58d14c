"""The agent's workspace: contexts fetched once per digest, verified, unpacked safely."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polyarch.agent import workspace as workspace_module
from polyarch.agent.builders.base import BuildFailed
from polyarch.agent.workspace import Workspace
from polyarch.proto.v1 import agent_pb2, common_pb2


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class ChunkedStub:
    """Streams a blob in small chunks, yielding to the loop between them like a real stream."""

    def __init__(self, blob: bytes, kind: common_pb2.ContextKind = common_pb2.CONTEXT_KIND_TAR):
        self.blob = blob
        self.kind = kind
        self.calls = 0
        self.chunks_sent = 0

    def FetchContext(
        self, request: agent_pb2.FetchContextRequest
    ) -> AsyncIterator[common_pb2.ContextChunk]:
        self.calls += 1

        async def chunks() -> AsyncIterator[common_pb2.ContextChunk]:
            for i in range(0, len(self.blob), 512):
                await asyncio.sleep(0)
                self.chunks_sent += 1
                kind = self.kind if i == 0 else common_pb2.CONTEXT_KIND_TAR
                yield common_pb2.ContextChunk(data=self.blob[i : i + 512], kind=kind)

        return chunks()


async def test_concurrent_jobs_share_one_download_of_a_context(tmp_path: Path) -> None:
    blob = tar_of({"Dockerfile": b"FROM scratch\n", "big": b"x" * 10_000})
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    stub = ChunkedStub(blob)
    workspace = Workspace(tmp_path)
    dirs = await asyncio.gather(
        *(workspace.fetch_context(stub, digest, workspace.job_dir(f"j{i}", 1)) for i in range(3))  # type: ignore[arg-type]
    )
    assert stub.calls == 1
    assert [(d / "Dockerfile").read_bytes() for d in dirs] == [b"FROM scratch\n"] * 3
    assert sorted(p.name for p in (tmp_path / "contexts").iterdir()) == [f"{digest[7:]}.tar"]


async def test_a_corrupted_context_is_rejected_and_not_cached(tmp_path: Path) -> None:
    blob = tar_of({"Dockerfile": b"FROM scratch\n"})
    claimed = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    workspace = Workspace(tmp_path)
    with pytest.raises(BuildFailed, match="context digest mismatch") as raised:
        await workspace.fetch_context(ChunkedStub(blob), claimed, workspace.job_dir("j", 1))  # type: ignore[arg-type]
    assert raised.value.infrastructure
    assert list((tmp_path / "contexts").iterdir()) == []


async def test_a_manifest_over_the_cap_is_refused_before_it_is_held_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workspace_module, "MAX_MANIFEST_BYTES", 2048)
    manifest = b'{"format":"polyarch.context.manifest.v1"}\n' + b"x" * 10_000
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    stub = ChunkedStub(manifest, common_pb2.CONTEXT_KIND_MANIFEST)
    workspace = Workspace(tmp_path)
    with pytest.raises(BuildFailed) as raised:
        await workspace.fetch_context(stub, digest, workspace.job_dir("j", 1))  # type: ignore[arg-type]
    assert (raised.value.step, raised.value.infrastructure) == ("unpack context", False)
    assert raised.value.message == "the context manifest is over the limit of 2048 bytes"
    assert stub.chunks_sent == 5  # 4 x 512 bytes fit; the fifth goes over: no more is read
    assert list((tmp_path / "contexts").iterdir()) == []


async def test_a_context_cannot_write_outside_its_directory(tmp_path: Path) -> None:
    blob = tar_of({"Dockerfile": b"FROM scratch\n", "../escape": b"no"})
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    workspace = Workspace(tmp_path / "ws")
    job_dir = workspace.job_dir("j", 1)
    with pytest.raises(BuildFailed) as raised:
        await workspace.fetch_context(ChunkedStub(blob), digest, job_dir)  # type: ignore[arg-type]
    assert (raised.value.step, raised.value.message, raised.value.infrastructure) == (
        "unpack context",
        "context member '../escape': has a '..' component",
        False,
    )
    assert not (tmp_path / "ws" / "jobs" / "escape").exists()
    assert list((job_dir / "context").iterdir()) == []  # the Dockerfile before it is gone too


@pytest.mark.parametrize(
    "job_id",
    ["../../victim", "a/b", "x\x1b[31m", "", ".hidden", "-rf", "a..b", "j\n", "x" * 129, "/abs"],
)
def test_an_unsafe_job_id_is_refused_before_touching_disk(tmp_path: Path, job_id: str) -> None:
    workspace = Workspace(tmp_path / "ws")
    victim = tmp_path / "victim-1"  # where ws/jobs/../../victim-1 lands
    victim.mkdir()
    (victim / "keep").write_bytes(b"x")
    with pytest.raises(BuildFailed) as raised:
        workspace.job_dir(job_id, 1)
    assert (raised.value.step, raised.value.infrastructure) == ("prepare", False)
    assert raised.value.message.startswith(f"refusing job id {job_id!r}: expected")
    assert "\x1b" not in raised.value.message and "\n" not in raised.value.message
    assert (victim / "keep").exists()
    assert list((tmp_path / "ws" / "jobs").iterdir()) == []


@pytest.mark.parametrize("attempt", [0, -1])
def test_an_attempt_below_one_is_refused(tmp_path: Path, attempt: int) -> None:
    workspace = Workspace(tmp_path)
    with pytest.raises(BuildFailed, match=rf"^prepare: refusing attempt {attempt}: expected a"):
        workspace.job_dir("j", attempt)
    assert list((tmp_path / "jobs").iterdir()) == []


def test_a_job_folder_is_fresh_and_private_whatever_the_umask(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    old_umask = os.umask(0o277)  # would make a plain mkdir(0o700) 0o500
    try:
        path = workspace.job_dir("0123456789abcdef-linux-arm-v7", 2)
        (path / "stale").write_bytes(b"x")
        again = workspace.job_dir("0123456789abcdef-linux-arm-v7", 2)
    finally:
        os.umask(old_umask)
    assert again == path == tmp_path / "jobs" / "0123456789abcdef-linux-arm-v7-2"
    assert list(path.iterdir()) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../x",
        "sha256:" + "A" * 64,
        "sha512:" + "a" * 128,
        "sha256:abc",
        "sha256:" + "a" * 64 + "\n",
        "sha256:" + "a" * 63 + "/",
        "",
    ],
)
async def test_an_unsafe_context_digest_is_refused_before_touching_disk(
    tmp_path: Path, digest: str
) -> None:
    workspace = Workspace(tmp_path)
    stub = ChunkedStub(tar_of({"Dockerfile": b"FROM scratch\n"}))
    job_dir = workspace.job_dir("j", 1)
    with pytest.raises(BuildFailed) as raised:
        await workspace.fetch_context(stub, digest, job_dir)  # type: ignore[arg-type]
    assert (raised.value.step, raised.value.infrastructure) == ("prepare", False)
    assert raised.value.message.startswith(f"refusing context digest {digest!r}: expected")
    assert stub.calls == 0
    assert list((tmp_path / "contexts").iterdir()) == []
    assert list(job_dir.iterdir()) == []


async def test_the_context_cache_is_trimmed_by_age_then_size_never_while_in_use(
    tmp_path: Path,
) -> None:
    workspace = Workspace(tmp_path / "agent", cache_max_age=100.0, cache_max_bytes=25)
    contexts = tmp_path / "agent" / "contexts"
    now = 10_000.0
    ages = {"a": 500.0, "b": 50.0, "c": 40.0, "d": 10.0}  # seconds since last use
    for name, age in ages.items():
        path = contexts / f"{name * 64}.tar"
        path.write_bytes(b"x" * 10)
        os.utime(path, (now - age, now - age))
    workspace._in_use["sha256:" + "b" * 64] = 1  # a job is unpacking b right now
    deleted = await workspace.trim_cache(now=now)
    # a: too old; then over 25 bytes: b is in use, so c (the oldest unused) goes
    assert deleted == ["sha256:" + "a" * 64, "sha256:" + "c" * 64]
    assert sorted(p.name[0] for p in contexts.glob("*.tar")) == ["b", "d"]

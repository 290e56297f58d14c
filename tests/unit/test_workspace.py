"""The agent's workspace: contexts fetched once per digest, verified, unpacked safely."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

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

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.calls = 0

    def FetchContext(
        self, request: agent_pb2.FetchContextRequest
    ) -> AsyncIterator[common_pb2.ContextChunk]:
        self.calls += 1

        async def chunks() -> AsyncIterator[common_pb2.ContextChunk]:
            for i in range(0, len(self.blob), 512):
                await asyncio.sleep(0)
                yield common_pb2.ContextChunk(data=self.blob[i : i + 512])

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

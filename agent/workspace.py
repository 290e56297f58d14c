"""The agent's working directory: per-job folders and build contexts fetched by digest."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tarfile
from pathlib import Path

from polyarch.agent.builders.base import BuildFailed
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc


class Workspace:
    """Caches contexts under root/contexts/<hex>.tar and unpacks one copy per job attempt."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "contexts").mkdir(parents=True, exist_ok=True)
        (root / "jobs").mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str, attempt: int) -> Path:
        path = self.root / "jobs" / f"{job_id}-{attempt}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    async def fetch_context(
        self, stub: agent_pb2_grpc.AgentServiceStub, digest: str, job_dir: Path
    ) -> Path:
        """Downloads the context (unless cached), verifies its digest and unpacks it."""
        hexdigest = digest.removeprefix("sha256:")
        cached = self.root / "contexts" / f"{hexdigest}.tar"
        if not cached.exists():
            await self._download(stub, digest, cached)
        target = job_dir / "context"
        target.mkdir()
        await asyncio.to_thread(_extract, cached, target)
        return target

    async def _download(
        self, stub: agent_pb2_grpc.AgentServiceStub, digest: str, cached: Path
    ) -> None:
        partial = cached.with_suffix(f".part{os.getpid()}")
        hasher = hashlib.sha256()
        with partial.open("wb") as out:
            async for chunk in stub.FetchContext(agent_pb2.FetchContextRequest(digest=digest)):
                hasher.update(chunk.data)
                await asyncio.to_thread(out.write, chunk.data)
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            partial.unlink(missing_ok=True)
            raise BuildFailed(
                "fetch context", f"context digest mismatch: expected {digest}, got {actual}", True
            )
        os.replace(partial, cached)


def _extract(archive: Path, target: Path) -> None:
    with tarfile.open(archive) as tar:
        # "data" refuses absolute paths, links out of the tree and device files.
        tar.extractall(target, filter="data")

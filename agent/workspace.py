"""The agent's working directory: per-job folders and build contexts fetched by digest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from polyarch.agent.builders.base import BuildFailed
from polyarch.agent.context_unpack import ContextRefused, unpack_context
from polyarch.coordinator.contexts.gc import select_for_deletion
from polyarch.coordinator.contexts.store import StoredContext
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc

# Job ids and digests come from the coordinator (possibly over plaintext) and become path
# names: anything else could point rmtree or the cache outside the work folder.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def check_job(job_id: str, attempt: int) -> None:
    """Refuses a job id or attempt that is not safe as (part of) a folder name."""
    if not _JOB_ID.fullmatch(job_id) or ".." in job_id:
        raise BuildFailed(
            "prepare", f"refusing job id {job_id!r}: expected 1-128 of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit, without '..'", infrastructure=False,
        )  # fmt: skip
    if attempt < 1:
        raise BuildFailed(
            "prepare", f"refusing attempt {attempt!r}: expected a positive integer",
            infrastructure=False,
        )  # fmt: skip


def check_digest(digest: str) -> None:
    """Refuses a context digest that is not sha256: and 64 lowercase hex digits."""
    if not _DIGEST.fullmatch(digest):
        raise BuildFailed(
            "prepare", f"refusing context digest {digest!r}: expected sha256: and 64 "
            "lowercase hex digits", infrastructure=False,
        )  # fmt: skip


# The agent's context cache: unused contexts older than this, then oldest first over the size.
CACHE_MAX_AGE_SECONDS = 7 * 86400.0
CACHE_MAX_BYTES = 20 << 30


class Workspace:
    """Caches contexts under root/contexts/<hex>.tar and unpacks one copy per job attempt;
    the cache is trimmed after each job (too old, then oldest first over its size)."""

    def __init__(
        self,
        root: Path,
        on_bytes: Callable[[int], None] = lambda _n: None,
        cache_max_age: float = CACHE_MAX_AGE_SECONDS,
        cache_max_bytes: int = CACHE_MAX_BYTES,
    ) -> None:
        self.root = root
        self._on_bytes = on_bytes
        self.cache_max_age = cache_max_age
        self.cache_max_bytes = cache_max_bytes
        # one download per digest at a time: concurrent jobs of one build share the context
        self._downloads: dict[str, asyncio.Lock] = {}
        # digests being downloaded or unpacked now: never trimmed
        self._in_use: dict[str, int] = {}
        (root / "contexts").mkdir(parents=True, exist_ok=True)
        (root / "jobs").mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str, attempt: int) -> Path:
        """A fresh, private (0700) folder for one job attempt; refuses unsafe ids first."""
        check_job(job_id, attempt)
        path = self.root / "jobs" / f"{job_id}-{attempt}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # whatever the umask: contexts may hold the user's secrets
        return path

    async def fetch_context(
        self, stub: agent_pb2_grpc.AgentServiceStub, digest: str, job_dir: Path
    ) -> Path:
        """Downloads the context (unless cached), verifies its digest and unpacks it."""
        check_digest(digest)
        hexdigest = digest.removeprefix("sha256:")
        cached = self.root / "contexts" / f"{hexdigest}.tar"
        self._in_use[digest] = self._in_use.get(digest, 0) + 1
        try:
            async with self._downloads.setdefault(digest, asyncio.Lock()):
                if not cached.exists():
                    await self._download(stub, digest, cached)
                else:
                    os.utime(cached)  # last used now: the cache trims the least recent
            target = job_dir / "context"
            target.mkdir()
            try:
                await asyncio.to_thread(unpack_context, cached, target)
            except ContextRefused as exc:
                # the archive is what the client sent: another agent would refuse it too
                raise BuildFailed("unpack context", str(exc), infrastructure=False) from exc
        finally:
            self._in_use[digest] -= 1
            if not self._in_use[digest]:
                del self._in_use[digest]
        return target

    async def trim_cache(self, now: float | None = None) -> list[str]:
        """Deletes cached contexts no job is fetching or unpacking: older than the max age,
        then oldest first while the cache is over its size. Returns the digests deleted."""
        entries = await asyncio.to_thread(self._cached_entries)
        chosen = select_for_deletion(
            entries, set(self._in_use), time.time() if now is None else now,
            self.cache_max_age, self.cache_max_bytes,
        )  # fmt: skip
        deleted = []
        for entry in chosen:
            if entry.digest in self._in_use:  # a job started using it since the scan
                continue
            path = self.root / "contexts" / f"{entry.digest.removeprefix('sha256:')}.tar"
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(path.unlink)
                deleted.append(entry.digest)
            self._downloads.pop(entry.digest, None)
        return deleted

    def _cached_entries(self) -> list[StoredContext]:
        entries = []
        for path in (self.root / "contexts").glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                digest = "sha256:" + path.name.removesuffix(".tar")
                entries.append(StoredContext(digest, stat.st_size, stat.st_mtime))
        return entries

    async def _download(
        self, stub: agent_pb2_grpc.AgentServiceStub, digest: str, cached: Path
    ) -> None:
        fd, name = tempfile.mkstemp(dir=cached.parent, suffix=".part")
        partial = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                request = agent_pb2.FetchContextRequest(digest=digest)
                async for chunk in stub.FetchContext(request):
                    await asyncio.to_thread(out.write, chunk.data)
                    self._on_bytes(len(chunk.data))
            # hash what landed on disk, not what went by: the file is what gets built
            actual = "sha256:" + await asyncio.to_thread(_sha256_of, partial)
            if actual != digest:
                raise BuildFailed(
                    "fetch context", f"context digest mismatch: expected {digest}, got {actual}",
                    True,
                )  # fmt: skip
            os.replace(partial, cached)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()

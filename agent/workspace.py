"""The agent's working directory: per-job folders and build contexts fetched by digest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from polyarch.agent import cache_trim
from polyarch.agent.blob_cache import BlobCache
from polyarch.agent.blob_fetch import fetch_blobs
from polyarch.agent.builders.base import BuildFailed
from polyarch.agent.context_layout import LayoutRefused, lay_out
from polyarch.agent.context_unpack import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MEMBERS,
    ContextRefused,
    unpack_context,
)
from polyarch.coordinator.contexts.gc import select_for_deletion
from polyarch.proto.context_manifest import ContextManifest, ManifestError
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

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
# Blobs no cached manifest uses are swept at most this often: a sweep reads every manifest.
SWEEP_INTERVAL_SECONDS = 60.0
# A manifest is held whole to decode it: ~1M entries of ~200 bytes fit, what a tar may hold.
MAX_MANIFEST_BYTES = 256 << 20
_DOCKERFILE_MAX = 4 << 20  # read to decide hard links or copies; bigger ones get copies
# Decoded manifests kept in memory (entries in total, ~450 bytes each): a rebuild of a
# context skips decoding (~10 ms per 1,000 entries).
_MEMORY_ENTRIES = 100_000


class Workspace:
    """Caches contexts under root/contexts: <hex>.tar, unpacked per job attempt, or
    <hex>.manifest, whose files come from root/blobs and are laid out per job attempt.
    The cache is trimmed after each job (too old, then oldest first over its size)."""

    def __init__(
        self,
        root: Path,
        on_bytes: Callable[[int], None] = lambda _n: None,
        cache_max_age: float = CACHE_MAX_AGE_SECONDS,
        cache_max_bytes: int = CACHE_MAX_BYTES,
        sweep_interval: float = SWEEP_INTERVAL_SECONDS,
    ) -> None:
        self.root = root
        self._on_bytes = on_bytes
        self.cache_max_age = cache_max_age
        self.cache_max_bytes = cache_max_bytes
        self.sweep_interval = sweep_interval
        # one download per digest at a time: concurrent jobs of one build share the context
        self._downloads: dict[str, asyncio.Lock] = {}
        # digests being downloaded, unpacked or laid out now: never trimmed
        self._in_use: dict[str, int] = {}
        (root / "contexts").mkdir(parents=True, exist_ok=True)
        (root / "jobs").mkdir(parents=True, exist_ok=True)
        self.blobs = BlobCache(root)
        self._manifests: OrderedDict[str, ContextManifest] = OrderedDict()
        self._weights: dict[str, int] = {}  # manifest digest -> bytes it takes in the cache
        self._sweep_due = True  # an earlier run may have left unreferenced blobs
        self._last_sweep = float("-inf")

    def job_dir(self, job_id: str, attempt: int) -> Path:
        """A fresh, private (0700) folder for one job attempt; refuses unsafe ids first."""
        check_job(job_id, attempt)
        path = self.root / "jobs" / f"{job_id}-{attempt}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # whatever the umask: contexts may hold the user's secrets
        return path

    async def fetch_context(
        self,
        stub: agent_pb2_grpc.AgentServiceStub,
        digest: str,
        job_dir: Path,
        dockerfile: str = "Dockerfile",
        may_link: Callable[[bytes | None], bool] = lambda _dockerfile: False,
    ) -> Path:
        """Downloads the context (unless cached), verifies its digest and unpacks it (a tar)
        or fetches the files the blob cache lacks and lays the tree out (a manifest): hard
        links into the cache when `may_link` says so of the job's Dockerfile, else copies."""
        check_digest(digest)
        self._in_use[digest] = self._in_use.get(digest, 0) + 1
        try:
            async with self._downloads.setdefault(digest, asyncio.Lock()):
                manifest = await self._cached_or_fetched(stub, digest)
            target = job_dir / "context"
            target.mkdir()
            if manifest is None:
                cached = self._path(digest, cache_trim.TAR_SUFFIX)
                try:
                    await asyncio.to_thread(unpack_context, cached, target)
                except ContextRefused as exc:
                    # the archive is what the client sent: another agent would refuse it too
                    raise BuildFailed("unpack context", str(exc), infrastructure=False) from exc
            else:
                await self._lay_out(stub, digest, manifest, target, dockerfile, may_link)
        finally:
            self._in_use[digest] -= 1
            if not self._in_use[digest]:
                del self._in_use[digest]
        return target

    async def trim_cache(self, now: float | None = None) -> list[str]:
        """Deletes cached contexts no job is using: older than the max age, then oldest
        first while the cache is over its size; then, at most once per sweep interval, the
        blobs no cached manifest uses. Returns the context digests deleted."""
        now = time.time() if now is None else now
        contexts = self.root / "contexts"
        entries = await asyncio.to_thread(cache_trim.cached_contexts, contexts, self._weights)
        chosen = select_for_deletion(
            entries, set(self._in_use), now, self.cache_max_age, self.cache_max_bytes
        )
        deleted = []
        for entry in chosen:
            if entry.digest in self._in_use:  # a job started using it since the scan
                continue
            for suffix in (cache_trim.TAR_SUFFIX, cache_trim.MANIFEST_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(self._path(entry.digest, suffix).unlink)
                    deleted.append(entry.digest)
                    self._sweep_due |= suffix == cache_trim.MANIFEST_SUFFIX
            self._manifests.pop(entry.digest, None)
            self._weights.pop(entry.digest, None)
            self._downloads.pop(entry.digest, None)
        if self._sweep_due and now - self._last_sweep >= self.sweep_interval:
            self._sweep_due = False
            self._last_sweep = now
            files, size = await asyncio.to_thread(self._sweep)
            if files:
                log.info("context cache: deleted %d unused blob file(s), %d bytes", files, size)
        return deleted

    def _sweep(self) -> tuple[int, int]:
        blobs, variants = cache_trim.referenced_by_manifests(self.root / "contexts")
        return self.blobs.sweep(blobs, variants)

    def _path(self, digest: str, suffix: str) -> Path:
        return self.root / "contexts" / (digest.removeprefix("sha256:") + suffix)

    async def _cached_or_fetched(
        self, stub: agent_pb2_grpc.AgentServiceStub, digest: str
    ) -> ContextManifest | None:
        """The context's manifest, or None when it is a tar, now in the cache. The kind is
        only known once fetched, so both cached forms are looked up first."""
        tar = self._path(digest, cache_trim.TAR_SUFFIX)
        if tar.exists():
            os.utime(tar)  # last used now: the cache trims the least recent
            return None
        manifest = self._manifests.get(digest)
        if manifest is None:
            manifest = await asyncio.to_thread(self._read_cached_manifest, digest)
        if manifest is None:
            return await self._download(stub, digest)
        self._remember(digest, manifest)
        return manifest

    def _read_cached_manifest(self, digest: str) -> ContextManifest | None:
        path = self._path(digest, cache_trim.MANIFEST_SUFFIX)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            path.unlink(missing_ok=True)  # damaged on disk: fetch it again
            return None
        return _decode(digest, data)

    def _remember(self, digest: str, manifest: ContextManifest) -> None:
        """Marks the manifest used now, on disk (for trimming) and in memory."""
        path = self._path(digest, cache_trim.MANIFEST_SUFFIX)
        try:
            os.utime(path)
        except FileNotFoundError:  # trimmed while only memory held it
            _write_atomically(path, manifest.encode())
        if digest not in self._weights:
            self._weights[digest] = cache_trim.manifest_weight(manifest.encode())
        self._manifests[digest] = manifest
        self._manifests.move_to_end(digest)
        held = sum(len(kept.entries) for kept in self._manifests.values())
        while held > _MEMORY_ENTRIES and len(self._manifests) > 1:
            _, dropped = self._manifests.popitem(last=False)
            held -= len(dropped.entries)

    async def _lay_out(
        self,
        stub: agent_pb2_grpc.AgentServiceStub,
        digest: str,
        manifest: ContextManifest,
        target: Path,
        dockerfile: str,
        may_link: Callable[[bytes | None], bool],
    ) -> None:
        # pinned before the cache is looked at: a concurrent sweep keeps what this job uses
        self.blobs.pin(manifest.blobs)
        try:
            await fetch_blobs(stub, digest, manifest, self.blobs, self._on_bytes)
            text = await asyncio.to_thread(_dockerfile_text, manifest, self.blobs, dockerfile)
            link = may_link(text)
            try:
                stats = await asyncio.to_thread(lay_out, manifest, target, self.blobs, link=link)
            except LayoutRefused as exc:
                raise BuildFailed("unpack context", str(exc), infrastructure=False) from exc
            log.debug("context %s laid out: %s", digest, stats)
        finally:
            self.blobs.unpin(manifest.blobs)

    async def _download(
        self, stub: agent_pb2_grpc.AgentServiceStub, digest: str
    ) -> ContextManifest | None:
        """Fetches the context: a tar goes to the cache as it streams; a manifest is read
        whole, verified and decoded first. Returns the manifest, or None for a tar."""
        call = stub.FetchContext(agent_pb2.FetchContextRequest(digest=digest))
        try:
            chunks = aiter(call)
            first = await anext(chunks, None)
            if first is not None and first.kind == common_pb2.CONTEXT_KIND_MANIFEST:
                data = await self._receive_manifest(digest, first, chunks)
                manifest = await asyncio.to_thread(_decode, digest, data)
                await asyncio.to_thread(
                    _write_atomically, self._path(digest, cache_trim.MANIFEST_SUFFIX), data
                )
                self._remember(digest, manifest)
                return manifest
            await self._receive_tar(digest, first, chunks)
            return None
        finally:
            cancel = getattr(call, "cancel", None)  # stops a stream abandoned part way
            if cancel is not None:
                cancel()

    async def _receive_manifest(
        self, digest: str, first: common_pb2.ContextChunk, chunks: AsyncIterator[Any]
    ) -> bytes:
        data = bytearray()
        chunk: common_pb2.ContextChunk | None = first
        while chunk is not None:
            if len(data) + len(chunk.data) > MAX_MANIFEST_BYTES:
                raise BuildFailed(
                    "unpack context", f"the context manifest is over the limit of "
                    f"{MAX_MANIFEST_BYTES} bytes", infrastructure=False,
                )  # fmt: skip
            data += chunk.data
            self._on_bytes(len(chunk.data))
            chunk = await anext(chunks, None)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BuildFailed(
                "fetch context", f"context digest mismatch: expected {digest}, got {actual}",
                True,
            )  # fmt: skip
        return bytes(data)

    async def _receive_tar(
        self, digest: str, first: common_pb2.ContextChunk | None, chunks: AsyncIterator[Any]
    ) -> None:
        cached = self._path(digest, cache_trim.TAR_SUFFIX)
        fd, name = tempfile.mkstemp(dir=cached.parent, suffix=".part")
        partial = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                if first is not None:
                    await asyncio.to_thread(out.write, first.data)
                    self._on_bytes(len(first.data))
                async for chunk in chunks:
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


def _decode(digest: str, data: bytes) -> ContextManifest:
    """Decodes with the tar unpacker's limits; a refusal is the client's context's fault."""
    try:
        return ContextManifest.decode(
            data, max_entries=DEFAULT_MAX_MEMBERS, max_bytes=DEFAULT_MAX_BYTES
        )
    except ManifestError as exc:
        raise BuildFailed(
            "unpack context", f"context manifest {digest} {exc}", infrastructure=False
        ) from exc


def _write_atomically(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()


def _dockerfile_text(manifest: ContextManifest, cache: BlobCache, dockerfile: str) -> bytes | None:
    """The job's Dockerfile from the cache, or None when the manifest has no plain file there
    (a symlink, say: then nobody reads it here, and the layout copies)."""
    wanted = "/".join(part for part in dockerfile.split("/") if part not in ("", "."))
    for entry in manifest.entries:
        if entry.path == wanted and entry.kind == "file" and entry.size <= _DOCKERFILE_MAX:
            return (cache.blobs_dir / entry.digest.removeprefix("sha256:")).read_bytes()
    return None

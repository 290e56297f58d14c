"""Build contexts on disk, content-addressed by sha256, streamed in chunks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from polyarch.coordinator.contexts.uploads import UploadSlots
from polyarch.coordinator.core.model import InvalidRequest, LimitExceeded, NotFound
from polyarch.coordinator.limits import Limits

CHUNK_SIZE = 1 << 20
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    """Returns the digest if it is a well-formed sha256 digest, else raises InvalidRequest."""
    if not _DIGEST.match(digest):
        raise InvalidRequest(f"malformed context digest {digest!r}: expected sha256:<64 hex>")
    return digest


@dataclass(frozen=True)
class StoredContext:
    """One stored context as garbage collection sees it."""

    digest: str
    size: int
    last_used: float  # the file's mtime: upload time, moved on by every later use


class ContextStore:
    """Stores each context once under root/sha256/<hex>; writes are atomic renames.

    A context's mtime is its "last used" time: set by the upload, moved to now by every
    lookup (a client's stat before submitting, a submit's validation, an agent's fetch),
    so it survives restarts and garbage collection needs no other bookkeeping.
    """

    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root = root
        self.limits = limits or Limits()
        self.uploads = UploadSlots(self.limits)
        # bytes under sha256/: counted by each scan, then kept up to date by writes and removals
        self.stored_bytes = 0
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str) -> Path:
        return self.root / "sha256" / check_digest(digest).removeprefix("sha256:")

    def size_of(self, digest: str) -> int | None:
        """The stored size, or None when the context is not stored. A hit counts as a use."""
        path = self.path_for(digest)
        try:
            os.utime(path)
            return path.stat().st_size
        except FileNotFoundError:
            return None

    async def write(self, digest: str, size: int, chunks: AsyncIterator[bytes]) -> bool:
        """Stores a streamed context; returns False (and drains nothing more) if already stored.

        The digest and size are verified before the file becomes visible, so a
        truncated or corrupted upload never masquerades as the context it names.
        """
        target = self.path_for(digest)
        limit = self.limits.max_context_bytes
        if size > limit:
            raise LimitExceeded(
                f"a context of {size} bytes is over the limit max_context_bytes={limit}"
            )
        if self.size_of(digest) is not None:
            return False
        hasher = hashlib.sha256()
        received = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > size:  # before writing a byte of it
                        raise InvalidRequest(f"context upload exceeds its declared size {size}")
                    hasher.update(chunk)
                    await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(out.flush)
                await asyncio.to_thread(os.fsync, out.fileno())
            actual = "sha256:" + hasher.hexdigest()
            if received != size or actual != digest:
                raise InvalidRequest(
                    f"context upload does not match its digest: declared {digest} "
                    f"({size} bytes), received {actual} ({received} bytes)"
                )
            os.replace(tmp_name, target)
            self.stored_bytes += size
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)

    async def read(self, digest: str, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """Streams a stored context in chunks."""
        path = self.path_for(digest)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"context {digest} is not stored on the coordinator") from None
        with handle:
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk

    def scan(self) -> list[StoredContext]:
        """Every stored context (blocking: run it in a thread); also recounts stored_bytes."""
        found = []
        for entry in os.scandir(self.root / "sha256"):
            digest = "sha256:" + entry.name
            if not _DIGEST.match(digest):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            found.append(StoredContext(digest, stat.st_size, stat.st_mtime))
        self.stored_bytes = sum(item.size for item in found)
        return found

    def sweep_temp_files(self, now: float | None = None) -> int:
        """Removes temp files no upload can still own (blocking); returns how many.

        An upload lives at most upload_deadline_seconds, so a temp file not written for
        longer is left from a crash (or a removal interrupted by one).
        """
        cutoff = (now or time.time()) - self.limits.upload_deadline_seconds
        removed = 0
        for entry in os.scandir(self.root / "tmp"):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def detach(self, item: StoredContext) -> Path | None:
        """Takes `item` out of the store unless it was used since it was scanned; returns the
        file to delete. A rename, so it is atomic with the caller's in-use check on the event
        loop; deleting the (possibly large) file is left to a thread."""
        path = self.path_for(item.digest)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if stat.st_mtime > item.last_used:
            return None
        doomed = self.root / "tmp" / f"gc-{path.name}"
        os.replace(path, doomed)
        self.stored_bytes -= stat.st_size
        return doomed

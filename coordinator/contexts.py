"""Build contexts on disk, content-addressed by sha256, streamed in chunks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from polyarch.coordinator.model import InvalidRequest, NotFound

CHUNK_SIZE = 1 << 20
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    """Returns the digest if it is a well-formed sha256 digest, else raises InvalidRequest."""
    if not _DIGEST.match(digest):
        raise InvalidRequest(f"malformed context digest {digest!r}: expected sha256:<64 hex>")
    return digest


class ContextStore:
    """Stores each context once under root/sha256/<hex>; writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str) -> Path:
        return self.root / "sha256" / check_digest(digest).removeprefix("sha256:")

    def size_of(self, digest: str) -> int | None:
        """The stored size, or None when the context is not stored."""
        try:
            return self.path_for(digest).stat().st_size
        except FileNotFoundError:
            return None

    async def write(self, digest: str, size: int, chunks: AsyncIterator[bytes]) -> bool:
        """Stores a streamed context; returns False (and drains nothing more) if already stored.

        The digest and size are verified before the file becomes visible, so a
        truncated or corrupted upload never masquerades as the context it names.
        """
        target = self.path_for(digest)
        if target.exists():
            return False
        hasher = hashlib.sha256()
        received = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > size:
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

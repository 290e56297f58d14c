"""The agent's file-content cache: verified blobs by sha256, and variants to hard-link from."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from polyarch.agent.builders.base import BuildFailed

if TYPE_CHECKING:
    from hashlib import _Hash

_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
# copy_file_range refuses some file system pairs; a plain read/write loop copies anything
_NO_COPY_RANGE = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


def hex_of(digest: str) -> str:
    return digest.removeprefix("sha256:")


def variant_name(digest: str, mode: int, mtime: int) -> str:
    """The cache name of a blob's copy carrying one file's permission bits and mtime.

    A hard link shares mode and mtime with every other name of its inode, so each
    (content, mode, mtime) a context needs is a file of its own."""
    return f"{hex_of(digest)}-{mode & 0o777:o}-{mtime}"


def set_mtime(path: int | str, mtime: int, *, dir_fd: int | None = None) -> None:
    """Sets atime and mtime to `mtime` whole seconds, as the tar unpacker does."""
    try:
        ns = mtime * 1_000_000_000
        os.utime(path, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=dir_fd is None)
    except (OverflowError, ValueError):
        pass  # an mtime the file system cannot hold is not worth failing a build over


def copy_blob(source: int, target: int, size: int, digest: str) -> None:
    """Copies a cached blob of `size` bytes; refuses one whose size on disk differs."""
    held = os.fstat(source).st_size
    if held != size:
        raise OSError(errno.EIO, f"cached blob {digest} holds {held} bytes, not {size}")
    copied = 0
    ranged = True
    while copied < size:
        want = min(size - copied, _CHUNK * 16)
        if ranged:
            try:
                done = os.copy_file_range(source, target, want, copied, copied)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE or copied:
                    raise
                ranged = False
                continue
        else:
            data = os.pread(source, min(want, _CHUNK), copied)
            done = len(data)
            view = memoryview(data)
            while view:
                view = view[os.pwrite(target, view, copied + len(data) - len(view)) :]
        if not done:
            raise OSError(errno.EIO, f"cached blob {digest} shrank while it was copied")
        copied += done


class BlobWriter:
    """Appends one blob's bytes to its partial file, hashing as they land; commit() verifies."""

    def __init__(self, cache: BlobCache, digest: str, size: int, offset: int, hasher: _Hash):
        self.cache = cache
        self.digest = digest
        self.size = size
        self.written = offset
        self._hasher = hasher
        self._partial = cache.blobs_dir / f"{hex_of(digest)}.partial"
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self._partial, flags | (0 if offset else os.O_TRUNC), 0o600)
        os.lseek(self._fd, offset, os.SEEK_SET)

    @property
    def complete(self) -> bool:
        return self.written == self.size

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.size:
            raise BuildFailed(
                "fetch context", f"blob {self.digest}: the coordinator sent more than its "
                f"{self.size} bytes", infrastructure=True,
            )  # fmt: skip
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._hasher.update(data)
        self.written += len(data)

    def commit(self, first_use: tuple[int, int] | None) -> None:
        """Verifies the digest, then makes the blob visible; `first_use` (mode, mtime) also
        files it as that variant (same inode: no copy for the common one-variant case)."""
        actual = "sha256:" + self._hasher.hexdigest()
        if actual != self.digest:
            self.close(keep=False)
            raise BuildFailed(
                "fetch context", f"blob {self.digest}: content digest mismatch, got {actual}; "
                "not cached", infrastructure=True,
            )  # fmt: skip
        # the blob must stay readable to copy further variants from it
        shared = first_use if first_use is not None and first_use[0] & 0o400 else None
        if shared is not None:
            os.fchmod(self._fd, shared[0] & 0o777)
            set_mtime(self._fd, shared[1])
        os.close(self._fd)
        self._fd = -1
        blob = self.cache.blobs_dir / hex_of(self.digest)
        os.replace(self._partial, blob)
        if shared is not None:
            with contextlib.suppress(OSError):  # the layout copies the blob when it is missing
                os.link(blob, self.cache.variants_dir / variant_name(self.digest, *shared))

    def close(self, *, keep: bool) -> None:
        """Drops the writer; `keep` leaves the partial file for a later resume."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not keep:
            self._partial.unlink(missing_ok=True)


class BlobCache:
    """root/blobs/<hex> (verified), <hex>.partial (an interrupted fetch) and
    root/variants/<hex>-<mode>-<mtime>; pinned digests are never swept."""

    def __init__(self, root: Path) -> None:
        self.blobs_dir = root / "blobs"
        self.variants_dir = root / "variants"
        for folder in (self.blobs_dir, self.variants_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)  # cached contents may hold the user's secrets
        # digest -> the fetch in flight: concurrent jobs never download one blob twice
        self.inflight: dict[str, asyncio.Future[None]] = {}
        # digests of the manifests jobs are using (hex -> count); the sweep runs in a
        # thread, so pinning and its check-then-unlink share a lock
        self._pins: Counter[str] = Counter()
        self._lock = threading.Lock()

    def pin(self, digests: Iterable[str]) -> None:
        with self._lock:
            self._pins.update(hex_of(digest) for digest in digests)

    def unpin(self, digests: Iterable[str]) -> None:
        with self._lock:
            self._pins.subtract(hex_of(digest) for digest in digests)
            self._pins = +self._pins  # drops the zeros

    def missing(self, blobs: dict[str, int]) -> dict[str, int]:
        """The blobs (digest -> size) that are not in the cache."""
        folder = str(self.blobs_dir) + "/"
        exists = os.path.exists
        return {digest: size for digest, size in blobs.items() if not exists(folder + digest[7:])}

    def resume_point(self, digest: str, size: int) -> tuple[int, _Hash] | None:
        """Where a fetch of the blob starts: (offset, hasher of the bytes before it), or
        None when a complete partial verified and became the blob."""
        partial = self.blobs_dir / f"{hex_of(digest)}.partial"
        hasher = hashlib.sha256()
        try:
            with partial.open("rb") as handle:
                held = os.fstat(handle.fileno()).st_size
                while held <= size and (block := handle.read(_CHUNK)):
                    hasher.update(block)
        except FileNotFoundError:
            return 0, hasher
        if held == size and "sha256:" + hasher.hexdigest() == digest:
            os.replace(partial, self.blobs_dir / hex_of(digest))
            return None
        if held >= size:  # longer than the blob, or complete but wrong: start again
            partial.unlink()
            return 0, hashlib.sha256()
        return held, hasher

    def open_writer(self, digest: str, size: int, offset: int, hasher: _Hash) -> BlobWriter:
        return BlobWriter(self, digest, size, offset, hasher)

    def make_variant(
        self, variants_fd: int, blobs_fd: int, digest: str, size: int, mode: int, mtime: int
    ) -> None:
        """Copies the blob into a new variant file: temp name, mode and mtime, then rename."""
        name = variant_name(digest, mode, mtime)
        temp = f"{name}.{secrets.token_hex(4)}.tmp"
        source = os.open(hex_of(digest), _READ_FLAGS, dir_fd=blobs_fd)
        try:
            target = os.open(temp, _NEW_FILE_FLAGS, 0o600, dir_fd=variants_fd)
            try:
                copy_blob(source, target, size, digest)
                os.fchmod(target, mode & 0o777)
                set_mtime(target, mtime)
            finally:
                os.close(target)
            # a concurrent job may have made the same variant: same content, either wins
            os.replace(temp, name, src_dir_fd=variants_fd, dst_dir_fd=variants_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=variants_fd)
            raise
        finally:
            os.close(source)

    def open_dirs(self) -> tuple[int, int]:
        """(blobs fd, variants fd) for a layout; the caller closes both."""
        blobs_fd = os.open(self.blobs_dir, _DIR_FLAGS)
        try:
            return blobs_fd, os.open(self.variants_dir, _DIR_FLAGS)
        except BaseException:
            os.close(blobs_fd)
            raise

    def sweep(self, blobs: set[str], variants: set[str]) -> tuple[int, int]:
        """Deletes blobs (and partials) whose hex is not in `blobs` and variants whose name
        is not in `variants`, sparing pinned digests. Returns (files, bytes) deleted."""
        count = size = 0
        for folder, keep in ((self.blobs_dir, blobs), (self.variants_dir, variants)):
            for entry in os.scandir(folder):
                hexdigest = entry.name[:64]
                key = hexdigest if folder == self.blobs_dir else entry.name
                if key in keep:
                    continue
                with contextlib.suppress(FileNotFoundError, IsADirectoryError), self._lock:
                    if self._pins[hexdigest] <= 0:
                        held = entry.stat(follow_symlinks=False)
                        os.unlink(entry.path)
                        count += 1
                        # a name of a shared inode frees nothing until its last link goes
                        size += held.st_size if held.st_nlink <= 1 else 0
        return count, size

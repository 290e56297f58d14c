"""File blobs of manifest contexts: stored once by sha256, uploaded with resume, read at offsets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from polyarch.coordinator.core.model import InvalidRequest, NotFound

CHUNK_SIZE = 1 << 20
SMALL_BLOB = 256 << 10  # a blob this small is read, hashed and written whole
_HEX = re.compile(r"[0-9a-f]{64}")


def blob_hex(digest: str) -> str:
    """The hex part of a "sha256:<hex>" blob digest; refuses anything else."""
    hex_part = digest.removeprefix("sha256:")
    if hex_part == digest or not _HEX.fullmatch(hex_part):
        raise InvalidRequest(f"malformed blob digest {digest!r}: expected sha256:<64 hex>")
    return hex_part


def is_blob_hex(name: str) -> bool:
    """Whether a file name in the store is a digest's hex (anything else is not ours)."""
    return _HEX.fullmatch(name) is not None


@dataclass(frozen=True)
class BlobPiece:
    """One message of a blob stream: a `digest` starts a blob (its size, and the offset the data
    starts at); an empty digest continues the current one."""

    digest: str
    size: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class StoredBlob:
    hex: str
    size: int
    mtime: float


class BlobMismatch(Exception):
    """A received blob whose content is not its digest (the partial is already deleted)."""

    def __init__(self, digest: str, actual: str, received: int) -> None:
        super().__init__(digest, actual, received)
        self.digest, self.actual, self.received = digest, actual, received


class BlobStore:
    """root/blobs/<hex> (complete, verified) and root/partial/<hex> (an interrupted upload).

    A blob's mtime is its "last protected" time: set by its upload, moved on by every
    manifest upload that lists it, so garbage collection spares a blob a new manifest
    relies on even if the manifest arrived after the collector's scan. `guard` serialises
    those touches with the collector's deletions.
    """

    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs"
        self.partials = root / "partial"
        self.tmp = root / "tmp"
        self.stored_bytes = 0  # counted by scan(), then kept up to date
        self.guard = asyncio.Lock()
        self._busy: dict[str, asyncio.Event] = {}  # digest -> set when its holder lets go
        for folder in (self.dir, self.partials, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str) -> Path:
        return self.dir / blob_hex(digest)

    def partial_for(self, digest: str) -> Path:
        return self.partials / blob_hex(digest)

    def present(self, digest: str) -> bool:
        return self.path_for(digest).exists()

    def partial_size(self, digest: str) -> int:
        try:
            return self.partial_for(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def touch_missing(self, blobs: Mapping[str, int]) -> dict[str, int]:
        """The blobs not stored (blocking); every stored one is touched. One syscall each."""
        missing: dict[str, int] = {}
        for digest, size in blobs.items():
            try:
                os.utime(self.path_for(digest))
            except FileNotFoundError:
                missing[digest] = size
        return missing

    # ---- one writer per digest -----------------------------------------------------------

    def try_claim(self, digest: str) -> bool:
        """Makes the caller the digest's only writer, unless another stream is."""
        if digest in self._busy:
            return False
        self._busy[digest] = asyncio.Event()
        return True

    async def claim(self, digest: str) -> None:
        """Waits for the digest's writer to let go. Never call it holding another claim:
        two streams each waiting for the other's blob would wait forever."""
        while not self.try_claim(digest):
            await self._busy[digest].wait()

    def release(self, digest: str) -> None:
        event = self._busy.pop(digest, None)
        if event is not None:
            event.set()

    def busy(self, digest: str) -> bool:
        return digest in self._busy

    async def settled(self, digests: Iterable[str], timeout: float) -> None:
        """Waits, up to `timeout`, until none of `digests` is claimed: a broken stream's last
        write lands before its claim goes, so a partial's size is then final."""
        claimed = [asyncio.ensure_future(self._busy[d].wait()) for d in digests if d in self._busy]
        if claimed:
            await asyncio.wait(claimed, timeout=timeout)
            for waiter in claimed:
                waiter.cancel()

    # ---- writes --------------------------------------------------------------------------

    async def put_whole(self, blobs: list[tuple[str, bytes]], then: Callable[[], None]) -> None:
        """Stores small blobs, already verified, in one thread hop, then calls `then` (which
        releases their claims) when the thread ends, even if this caller was cancelled."""
        future = asyncio.get_running_loop().run_in_executor(None, self._put_whole, blobs)

        def count(done: asyncio.Future[int]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.stored_bytes += done.result()
            then()

        future.add_done_callback(count)
        await asyncio.shield(future)

    def _put_whole(self, blobs: list[tuple[str, bytes]]) -> int:
        stored = 0
        for digest, data in blobs:
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp_name, self.path_for(digest))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
            stored += len(data)
        return stored

    def writer(self, digest: str, size: int, offset: int) -> BlobWriter:
        """A writer of the digest's partial; start() opens it. The caller holds the claim."""
        return BlobWriter(self, digest, size, offset)

    # ---- reads ---------------------------------------------------------------------------

    async def read(self, ranges: Iterable[tuple[str, int, int]]) -> AsyncIterator[BlobPiece]:
        """Each (digest, size, offset) as BlobPieces from its offset: small remainders
        batched up to CHUNK_SIZE per thread hop, large ones in CHUNK_SIZE pieces."""
        batch: list[tuple[str, int, int]] = []
        batched = 0
        for digest, size, offset in ranges:
            if size - offset <= SMALL_BLOB:
                if batched + size - offset > CHUNK_SIZE:
                    for piece in await asyncio.to_thread(self._read_small, batch):
                        yield piece
                    batch, batched = [], 0
                batch.append((digest, size, offset))
                batched += size - offset
                continue
            if batch:
                for piece in await asyncio.to_thread(self._read_small, batch):
                    yield piece
                batch, batched = [], 0
            position = offset
            while position < size:
                data = await asyncio.to_thread(self._read_at, digest, position, CHUNK_SIZE)
                if not data:
                    raise NotFound(f"blob {digest} is shorter on the coordinator than {size}")
                if position == offset:
                    yield BlobPiece(digest, size, offset, data)
                else:
                    yield BlobPiece("", 0, 0, data)
                position += len(data)
        if batch:
            for piece in await asyncio.to_thread(self._read_small, batch):
                yield piece

    def _read_small(self, batch: list[tuple[str, int, int]]) -> list[BlobPiece]:
        pieces = []
        for digest, size, offset in batch:
            data = self._read_at(digest, offset, size - offset)
            if len(data) != size - offset:
                raise NotFound(f"blob {digest} is shorter on the coordinator than {size}")
            pieces.append(BlobPiece(digest, size, offset, data))
        return pieces

    def _read_at(self, digest: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self.path_for(digest), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not stored on the coordinator") from None
        try:
            return os.pread(fd, length, offset) if length else b""
        finally:
            os.close(fd)

    # ---- garbage collection (blocking: run in a thread) ----------------------------------

    def scan(self) -> list[StoredBlob]:
        """Every stored blob; also recounts stored_bytes."""
        found = []
        for entry in os.scandir(self.dir):
            if not is_blob_hex(entry.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                stat = entry.stat()
                found.append(StoredBlob(entry.name, stat.st_size, stat.st_mtime))
        self.stored_bytes = sum(blob.size for blob in found)
        return found

    def delete_unprotected(self, blobs: Iterable[StoredBlob], cutoff: float) -> tuple[int, int]:
        """Deletes each blob not touched since `cutoff` (blocking; hold `guard`): a manifest
        upload touches the blobs it lists under the same guard, so none it counted as
        present goes. Returns (count, bytes); the caller subtracts the bytes."""
        count = size = 0
        for blob in blobs:
            path = self.dir / blob.hex
            try:
                if path.stat().st_mtime >= cutoff:
                    continue
                doomed = self.tmp / f"gc-blob-{blob.hex}"
                os.replace(path, doomed)
                size += doomed.stat().st_size
                os.unlink(doomed)
            except FileNotFoundError:
                continue
            count += 1
        return count, size

    def sweep_partials(self, cutoff: float) -> int:
        """Removes partial uploads not written since `cutoff` whose digest no stream holds
        (on the event loop, so no stream can claim one between the check and the unlink)."""
        removed = 0
        for entry in os.scandir(self.partials):
            if not is_blob_hex(entry.name) or self.busy("sha256:" + entry.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed


class BlobWriter:
    """One blob being received into its partial file; finish() verifies and publishes it."""

    def __init__(self, store: BlobStore, digest: str, size: int, offset: int) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.offset = offset
        self.received = offset
        self._hasher = hashlib.sha256()
        self._fd = -1
        self._last: asyncio.Future[None] | None = None

    @property
    def complete(self) -> bool:
        return self.received == self.size

    async def start(self) -> None:
        """Continues the partial at `offset` (its bytes re-hashed) or restarts it at 0; any
        other offset is refused, naming both numbers."""
        await asyncio.shield(self._in_thread(self._open))

    def _open(self) -> None:
        path = self.store.partial_for(self.digest)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            held = os.fstat(fd).st_size
            if self.offset == 0:
                os.ftruncate(fd, 0)
            elif self.offset != held:
                raise InvalidRequest(
                    f"blob {self.digest}: the upload resumes at offset {self.offset}, but the "
                    f"coordinator holds {held} bytes of it; resume at {held} or send from 0"
                )
            position = 0
            while position < self.offset:  # hashlib's state cannot be saved: re-hash the prefix
                data = os.pread(fd, min(CHUNK_SIZE, self.offset - position), position)
                if not data:
                    raise InvalidRequest(f"blob {self.digest}: its partial upload shrank")
                self._hasher.update(data)
                position += len(data)
            os.lseek(fd, self.offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    async def write(self, data: bytes) -> None:
        if len(data) > self.size - self.received:  # refused before a byte of it is written
            raise InvalidRequest(
                f"blob {self.digest} exceeds its declared size {self.size} "
                f"({self.received} bytes received, {len(data)} more sent)"
            )
        self.received += len(data)
        # One write in flight while the next chunk is received: the previous one must be
        # done (its error raised here) before this one starts, as they share the file.
        if self._last is not None:
            await asyncio.shield(self._last)
        self._in_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        self._hasher.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    async def finish(self) -> None:
        """Verifies, fsyncs and renames the blob into place; on a mismatch deletes the
        partial and raises BlobMismatch. The writer is closed either way."""
        if self._last is not None:
            await asyncio.shield(self._last)
        future = self._in_thread(self._finish, self._fd)
        self._fd = -1  # the thread closes it, whatever happens to this caller

        def count(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.store.stored_bytes += self.size

        future.add_done_callback(count)
        await asyncio.shield(future)

    def _finish(self, fd: int) -> None:
        partial = self.store.partial_for(self.digest)
        actual = "sha256:" + self._hasher.hexdigest()
        try:
            if actual != self.digest:
                partial.unlink(missing_ok=True)
                raise BlobMismatch(self.digest, actual, self.received)
            os.fsync(fd)
            os.replace(partial, self.store.path_for(self.digest))
        finally:
            os.close(fd)

    def abandon(self, then: Callable[[], None]) -> None:
        """Keeps the partial for a resume: closes it once any thread work in flight ends,
        then calls `then` (which releases the claim). No fsync: a partial torn by a crash
        fails verification at the end of its resume and is restarted then."""

        def close(done: asyncio.Future[None] | None = None) -> None:
            if done is not None and not done.cancelled():
                done.exception()  # seen here: its caller is gone
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            with contextlib.suppress(FileNotFoundError):
                partial = self.store.partial_for(self.digest)
                if partial.stat().st_size == 0:
                    partial.unlink()  # nothing to resume from
            then()

        last = self._last
        if last is not None and not last.done():
            last.add_done_callback(close)
        else:
            close(last)

    def _in_thread(self, function: Callable[..., None], *args: object) -> asyncio.Future[None]:
        """`function` in a thread; abandon() waits for the last one to end before closing."""
        self._last = asyncio.get_running_loop().run_in_executor(None, function, *args)
        return self._last

"""One UploadBlobs stream: the blobs of one manifest, each checked, written resumably, verified."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from polyarch.coordinator.contexts.blobs import (
    CHUNK_SIZE,
    SMALL_BLOB,
    BlobMismatch,
    BlobPiece,
    BlobWriter,
)
from polyarch.coordinator.contexts.store import ContextStore
from polyarch.coordinator.core.model import InvalidRequest, LimitExceeded

_BATCH_BLOBS = 256  # small blobs written per thread hop, at most CHUNK_SIZE bytes in all
_SETTLE_SECONDS = 10.0  # a bound on the wait for one write in flight


@dataclass
class UploadReport:
    stored_blobs: int = 0  # completed and verified by this stream
    stored_bytes: int = 0
    discarded_blobs: int = 0  # already stored when they came: drained, not written
    missing_blobs: int = 0  # what the manifest still lacks after the stream
    missing_bytes: int = 0


@dataclass
class _Current:
    """The blob the stream is sending; `writer` while its bytes go to its partial file."""

    digest: str
    size: int
    received: int
    writer: BlobWriter | None = None


class BlobReceiver:
    """Receives one stream of blobs for manifest `context`.

    Each blob must be listed by the manifest, with its size; its data must start at 0 or at
    the offset the coordinator holds. One stream writes a digest at a time (a claim on it);
    a second one waiting for the claim then finds the blob stored and drains its copy. A
    blob left incomplete (the stream ends, breaks, or moves on) keeps its partial for a
    resume. Small blobs that arrive whole are verified at once and written in batches.
    """

    def __init__(self, store: ContextStore, context: str, listed: dict[str, int]) -> None:
        self.store = store
        self.blobs = store.blobs
        self.context = context
        self.listed = listed
        self.report = UploadReport()
        self._current: _Current | None = None
        self._batch: list[tuple[str, bytes]] = []
        self._batched = 0

    async def receive(self, pieces: AsyncIterator[BlobPiece]) -> UploadReport:
        try:
            async for piece in pieces:
                if piece.digest:
                    await self._start(piece)
                elif self._current is None:
                    raise InvalidRequest("the first blob chunk must name its blob's digest")
                else:
                    await self._write(piece.data)
            await self._leave_current()
            await self._flush()
        except BaseException:
            await self._abandon()
            raise
        report = self.report
        report.missing_blobs, report.missing_bytes = await self.store.settle(self.context)
        return report

    async def _start(self, piece: BlobPiece) -> None:
        await self._leave_current()
        digest, offset = piece.digest, piece.offset
        size = self.listed.get(digest)
        if size is None:
            raise InvalidRequest(
                f"blob {digest} is not listed by context {self.context}: only the blobs of "
                "its files can be uploaded for it"
            )
        if piece.size != size:
            raise InvalidRequest(f"blob {digest} is listed with {size} bytes, not {piece.size}")
        limit = self.store.limits.max_context_bytes
        if size > limit:
            raise LimitExceeded(
                f"a blob of {size} bytes is over the limit max_context_bytes={limit}"
            )
        if not 0 <= offset <= size:
            raise InvalidRequest(f"blob {digest}: offset {offset} is outside its {size} bytes")
        self._check_bound(digest, size, offset, piece.data)
        if not self.blobs.try_claim(digest):
            await self._flush()  # never wait for a claim while holding some
            await self.blobs.claim(digest)
        if self.blobs.present(digest):
            self.blobs.release(digest)
            self.report.discarded_blobs += 1
            self._current = _Current(digest, size, offset + len(piece.data))
            return
        if offset == 0 and len(piece.data) == size <= SMALL_BLOB:
            await self._put_whole(digest, piece.data)
            return
        current = self._current = _Current(
            digest, size, offset, self.blobs.writer(digest, size, offset)
        )
        assert current.writer is not None
        await current.writer.start()
        await self._write(piece.data)

    async def _write(self, data: bytes) -> None:
        current = self._current
        assert current is not None
        self._check_bound(current.digest, current.size, current.received, data)
        current.received += len(data)
        writer = current.writer
        if writer is None:  # drained: already stored, or written whole
            return
        await writer.write(data)
        if not writer.complete:
            return
        try:
            await writer.finish()
        except BlobMismatch as exc:
            current.writer = None
            self.blobs.release(current.digest)
            raise await self._mismatch(exc) from None
        current.writer = None
        self.blobs.release(current.digest)
        self.report.stored_blobs += 1
        self.report.stored_bytes += current.size

    @staticmethod
    def _check_bound(digest: str, size: int, received: int, data: bytes) -> None:
        if len(data) > size - received:  # refused before a byte of it is written
            raise InvalidRequest(
                f"blob {digest} exceeds its declared size {size} "
                f"({received} bytes received, {len(data)} more sent)"
            )

    async def _put_whole(self, digest: str, data: bytes) -> None:
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        self._current = _Current(digest, len(data), len(data))
        if actual != digest:
            self.blobs.release(digest)
            raise await self._mismatch(BlobMismatch(digest, actual, len(data)))
        self._batch.append((digest, data))
        self._batched += len(data)
        if len(self._batch) >= _BATCH_BLOBS or self._batched >= CHUNK_SIZE:
            await self._flush()

    async def _flush(self) -> None:
        batch, self._batch, self._batched = self._batch, [], 0
        if not batch:
            return

        def release() -> None:
            for digest, _ in batch:
                self.blobs.release(digest)

        await self.blobs.put_whole(batch, release)
        self.report.stored_blobs += len(batch)
        self.report.stored_bytes += sum(len(data) for _, data in batch)

    async def _mismatch(self, exc: BlobMismatch) -> InvalidRequest:
        manifests = self.store.manifests
        path = await asyncio.to_thread(manifests.path_of_blob, self.context, exc.digest)
        return InvalidRequest(
            f"blob {exc.digest} (file {path!r}) does not match its digest: received "
            f"{exc.actual} ({exc.received} bytes); it was not stored"
        )

    async def _leave_current(self) -> None:
        """An unfinished blob's partial stays for a resume (MissingBlobs reports its offset):
        its last write lands before this returns, unless the wait is cancelled."""
        current, self._current = self._current, None
        if current is not None and current.writer is not None:
            current.writer.abandon(lambda: self.blobs.release(current.digest))
            await self.blobs.settled([current.digest], _SETTLE_SECONDS)

    async def _abandon(self) -> None:
        """On a failed or broken stream: keeps the partial; drops unwritten small blobs."""
        for digest, _ in self._batch:
            self.blobs.release(digest)
        self._batch, self._batched = [], 0
        await self._leave_current()

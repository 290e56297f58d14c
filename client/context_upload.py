"""Sends a build context: its manifest, then only the file contents the coordinator lacks."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import BinaryIO

import grpc

from polyarch.client.api import CHUNK_SIZE, BuildClient, PolyarchError
from polyarch.client.context import ContextError
from polyarch.client.context_manifest import ManifestContext
from polyarch.client.file_hashes import hash_file
from polyarch.client.upload_progress import UploadProgress, summary_line
from polyarch.proto.registries import backoff_delay
from polyarch.proto.v1 import build_pb2, common_pb2

BATCH_BYTES = 1 << 20  # read per thread hop: many small files, or one chunk of a big one
_MESSAGE_COST = 256  # counted per message too, so 10,000 empty files are not one batch
MAX_FAILURES = 5  # blob streams in a row that end without progress before giving up
_S = grpc.StatusCode
# How an upload that was cut off ends; the coordinator keeps what it verified, so resume.
INTERRUPTED = frozenset(
    {_S.UNAVAILABLE, _S.DEADLINE_EXCEEDED, _S.INTERNAL, _S.UNKNOWN, _S.ABORTED, _S.CANCELLED}
)
# What a coordinator that knows MissingBlobs may answer for a manifest it has not seen.
_KNOWS_MANIFESTS = frozenset({_S.NOT_FOUND, _S.FAILED_PRECONDITION, _S.INVALID_ARGUMENT})


@dataclass(frozen=True)
class SentContext:
    """A context the coordinator holds now: what to submit, and what sending it took."""

    digest: str  # SubmitBuildRequest.context_digest: the manifest's, or the tar's
    dockerfile: str  # SubmitBuildRequest.dockerfile
    present: bool = False  # the coordinator had it: nothing was sent
    as_tar: bool = False  # the coordinator takes only tars: the context went as one
    sent_blobs: int = 0
    sent_bytes: int = 0  # file contents (or the tar) handed to gRPC, resent parts included


def _changed(path: str) -> ContextError:
    return ContextError(f"{path} changed while the context was being sent; run again")


class _BlobReader:
    """Reads the blobs to send from their files, about BATCH_BYTES per call (in a thread)."""

    def __init__(self, context: ManifestContext, ranges: Iterable[common_pb2.BlobRange]) -> None:
        self._context = context
        self._ranges = deque(ranges)
        self._lock = threading.Lock()  # close() waits for a batch being read
        self._file: BinaryIO | None = None
        self._blob: common_pb2.BlobRange | None = None
        self._left = 0
        self._starts = False
        self._first_message = True
        self._closed = False
        self.error: ContextError | None = None

    def batch(self) -> list[tuple[build_pb2.UploadBlobsChunk, str]]:
        """The next messages, each with the digest of the blob it ends ("" if none); [] at
        the end. A file that changed ends the stream early, its error kept in `error`."""
        out: list[tuple[build_pb2.UploadBlobsChunk, str]] = []
        with self._lock:
            size = 0
            try:
                while size < BATCH_BYTES and not self._closed:
                    if self._blob is None and not self._next_blob():
                        break
                    message, done = self._message()
                    out.append((message, done))
                    size += len(message.blob.data) + _MESSAGE_COST
            except ContextError as exc:
                self.error = exc
                self._closed = True
                self._close_file()
        return out

    def _next_blob(self) -> bool:
        if not self._ranges:
            return False
        blob = self._ranges.popleft()
        self._blob, self._left, self._starts = blob, blob.size - blob.offset, True
        if self._left:
            source = self._context.sources[blob.digest]
            try:  # open across batches: closed by _close_file()
                self._file = open(source.path, "rb", buffering=0)  # noqa: SIM115
            except FileNotFoundError:
                raise _changed(source.path) from None
            except OSError as exc:
                raise ContextError(f"cannot read {source.path}: {exc.strerror}") from None
            if os.fstat(self._file.fileno()).st_ino != source.inode:
                raise _changed(source.path)
            self._file.seek(blob.offset)
        return True

    def _message(self) -> tuple[build_pb2.UploadBlobsChunk, str]:
        blob = self._blob
        assert blob is not None
        data = b""
        if self._left:
            assert self._file is not None
            data = self._file.read(min(CHUNK_SIZE, self._left))
            if not data:  # the file shrank since it was hashed
                raise _changed(self._context.sources[blob.digest].path)
            self._left -= len(data)
        chunk = common_pb2.BlobChunk(data=data)
        if self._starts:
            chunk.digest, chunk.size, chunk.offset = blob.digest, blob.size, blob.offset
            self._starts = False
        message = build_pb2.UploadBlobsChunk(blob=chunk)
        if self._first_message:
            message.context_digest = self._context.digest
            self._first_message = False
        if self._left:
            return message, ""
        self._close_file()
        self._blob = None
        return message, blob.digest

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close_file()


async def _messages(
    reader: _BlobReader, progress: UploadProgress, ended: set[str]
) -> AsyncIterator[build_pb2.UploadBlobsChunk]:
    """The stream of one UploadBlobs call; the next batch is read while this one goes.
    A blob is in `ended` once its last message is handed to gRPC (which may not ask for
    another message after the coordinator refused that one)."""
    pending = asyncio.ensure_future(asyncio.to_thread(reader.batch))
    while batch := await pending:
        pending = asyncio.ensure_future(asyncio.to_thread(reader.batch))
        for message, done in batch:
            if done:
                ended.add(done)
            progress.advance(len(message.blob.data))
            yield message


class _BlobSender:
    """Sends what MissingBlobs lists, resuming from the coordinator's offsets after a break."""

    def __init__(
        self, client: BuildClient, context: ManifestContext, progress: UploadProgress
    ) -> None:
        self.client, self.context, self.progress = client, context, progress
        self.failures = 0
        self.sent_bytes = 0

    async def run(self) -> int:
        """Sends every missing blob; returns how many were missing at first."""
        ranges: list[common_pb2.BlobRange] | None = None
        total: int | None = None
        best = 0
        suspects: set[str] = set()  # blobs sent in full by a stream that failed
        first_count = 0
        while True:
            if ranges is None:
                ranges = await self._missing()
                if ranges is None:
                    continue
            await self._check_unchanged(suspects & {blob.digest for blob in ranges})
            self._check_ranges(ranges)
            remaining = sum(blob.size - blob.offset for blob in ranges)
            if total is None:
                total, best, first_count = remaining, remaining, len(ranges)
                self.progress.note(summary_line(
                    self.context.files, self.context.total_bytes, len(ranges), remaining
                ))  # fmt: skip
                self.progress.start(total)
            if not ranges:
                return first_count
            if remaining < best:
                best, self.failures = remaining, 0  # progress: the count starts again
            self.progress.update(max(0, total - remaining))
            reader = _BlobReader(self.context, ranges)
            suspects = set()
            error: PolyarchError | None = None
            response = build_pb2.UploadBlobsResponse()
            sent_before = self.progress.sent
            try:
                response = await self.client.upload_blobs(
                    _messages(reader, self.progress, suspects)
                )
            except PolyarchError as exc:
                error = exc
            finally:
                reader.close()
                self.sent_bytes += max(0, self.progress.sent - sent_before)
            if reader.error is not None:
                raise reader.error
            if error is None and response.missing_blobs == 0:
                return first_count
            ranges = None
            if error is not None and error.code not in INTERRUPTED:
                # a refused blob whose file changed since it was hashed says so
                ranges = await self._missing(give_up=True)
                await self._check_unchanged(suspects & {blob.digest for blob in ranges or []})
                raise error
            await self._failed(error or PolyarchError(
                f"the coordinator still lacks {response.missing_blobs} files of the context "
                "after an upload of them"
            ))  # fmt: skip

    async def _missing(self, give_up: bool = False) -> list[common_pb2.BlobRange] | None:
        """MissingBlobs; None when the coordinator could not answer (counted as a failure)."""
        try:
            return await self.client.missing_blobs(self.context.digest)
        except PolyarchError as exc:
            if give_up:
                return None
            if exc.code == _S.NOT_FOUND:  # the manifest went (a coordinator restart): again
                await self.client.upload_manifest(
                    self.context.digest, self.context.manifest.encode()
                )
            elif exc.code not in INTERRUPTED:
                raise
            await self._failed(exc)
            return None

    async def _failed(self, error: PolyarchError) -> None:
        self.failures += 1
        if self.failures >= MAX_FAILURES:
            raise PolyarchError(
                f"the context upload failed {self.failures} times in a row without "
                f"progress; the last time: {error}",
                error.code,
            )
        self.progress.note(f"context upload interrupted ({error}); resuming where it stopped")
        await asyncio.sleep(backoff_delay(self.failures - 1, 0.2, cap=5.0))

    def _check_ranges(self, ranges: list[common_pb2.BlobRange]) -> None:
        blobs = self.context.manifest.blobs
        for blob in ranges:
            if blobs.get(blob.digest) != blob.size or not 0 <= blob.offset <= blob.size:
                raise PolyarchError(
                    f"the coordinator asked for blob {blob.digest} (size {blob.size}, from "
                    f"offset {blob.offset}), which this context does not list so",
                    _S.FAILED_PRECONDITION,
                )

    async def _check_unchanged(self, digests: set[str]) -> None:
        """Hashes the files of `digests` again: one that changed ends the upload, named."""
        for digest in sorted(digests):
            source = self.context.sources[digest]
            try:
                now, _ = await asyncio.to_thread(hash_file, source)
            except ContextError:
                raise _changed(source.path) from None
            if now != digest:
                raise _changed(source.path)


async def _takes_manifests(client: BuildClient, digest: str) -> bool:
    """Asks before sending a manifest: a coordinator from before manifests would store one
    as a tar. Those answer UNIMPLEMENTED; newer ones list nothing, or say it is unknown."""
    try:
        await client.missing_blobs(digest)
    except PolyarchError as exc:
        if exc.code == _S.UNIMPLEMENTED:
            return False
        if exc.code not in _KNOWS_MANIFESTS:
            raise
    return True


async def send_tar(
    client: BuildClient,
    context: ManifestContext,
    progress: UploadProgress,
    spool_dir: str | os.PathLike[str] | None = None,
) -> SentContext:
    """The old way: the same tree packed into a tar (pack_context) and uploaded whole."""
    packed = await asyncio.to_thread(context.pack, spool_dir)
    try:
        uploaded = await client.upload_context(packed)
    finally:
        packed.discard()
    where = "uploaded" if uploaded else "already on coordinator"
    progress.note(f"context {packed.digest} ({packed.size} bytes) {where}")
    return SentContext(
        packed.digest, packed.dockerfile, present=not uploaded, as_tar=True,
        sent_bytes=packed.size if uploaded else 0,
    )  # fmt: skip


async def send_context(
    client: BuildClient,
    context: ManifestContext,
    progress: UploadProgress | None = None,
    *,
    spool_dir: str | os.PathLike[str] | None = None,
) -> SentContext:
    """Makes sure the coordinator holds `context`, sending only what it lacks.

    StatContext(manifest digest) present: nothing to send. Else the manifest goes up, and
    the file contents the coordinator lacks (MissingBlobs) stream in one UploadBlobs call,
    resumed from the coordinator's offsets after a break (MAX_FAILURES in a row without
    progress give up). A coordinator that knows no manifests gets the tar (send_tar).
    """
    progress = progress or UploadProgress(sys.stderr, "quiet")
    digest = context.digest
    stat = await client.stat_context(digest)
    if stat.present:
        progress.note(f"context {digest} already on the coordinator")
        return SentContext(digest, context.dockerfile, present=True)
    if 0 < stat.max_bytes < context.total_bytes:
        raise PolyarchError(
            f"the build context is {context.total_bytes} bytes; this coordinator accepts at "
            f"most {stat.max_bytes} (its --limit max_context_bytes): trim it with .dockerignore",
            _S.RESOURCE_EXHAUSTED,
        )
    if not await _takes_manifests(client, digest):
        return await send_tar(client, context, progress, spool_dir)
    try:
        response = await client.upload_manifest(digest, context.manifest.encode())
    except PolyarchError as exc:
        if exc.code != _S.UNIMPLEMENTED:
            raise
        return await send_tar(client, context, progress, spool_dir)
    if response.missing_blobs == 0:
        progress.note(summary_line(context.files, context.total_bytes, 0, 0))
        return SentContext(digest, context.dockerfile)
    sender = _BlobSender(client, context, progress)
    try:
        blobs = await sender.run()
    except BaseException:
        progress.abandon()
        raise
    progress.finish()
    return SentContext(digest, context.dockerfile, sent_blobs=blobs, sent_bytes=sender.sent_bytes)

"""Fetches the blobs of a manifest context that the agent's cache lacks, verified and resumable."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from polyarch.agent.blob_cache import BlobCache, BlobWriter
from polyarch.agent.builders.base import BuildFailed
from polyarch.proto.context_manifest import ContextManifest
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc, common_pb2

if TYPE_CHECKING:
    from hashlib import _Hash

# Ranges per FetchBlobs request: ~100 bytes each, so a request stays well under gRPC's 4 MiB.
MAX_RANGES_PER_REQUEST = 10_000
# Chunks at least this big are written from a thread; smaller ones cost less than the hop.
_THREAD_WRITE_BYTES = 256 << 10


def first_uses(manifest: ContextManifest) -> dict[str, tuple[int, int]]:
    """Each blob's (mode, mtime) at its first path: the variant its fetched inode becomes."""
    uses: dict[str, tuple[int, int]] = {}
    for entry in manifest.entries:
        if entry.kind == "file" and entry.digest not in uses:
            uses[entry.digest] = (entry.mode & 0o777, entry.mtime)
    return uses


def _failed(message: str) -> BuildFailed:
    # the coordinator or the network sent something wrong: another attempt may do better
    return BuildFailed("fetch context", message, infrastructure=True)


async def fetch_blobs(
    stub: agent_pb2_grpc.AgentServiceStub,
    context_digest: str,
    manifest: ContextManifest,
    cache: BlobCache,
    on_bytes: Callable[[int], None],
) -> int:
    """Makes every blob of `manifest` present in `cache`, downloading only the missing ones
    and waiting for those another job is downloading. The caller has pinned them.
    Returns how many blobs this call downloaded."""
    uses = first_uses(manifest)
    fetched = 0
    while True:
        missing = await asyncio.to_thread(cache.missing, manifest.blobs)
        if not missing:
            return fetched
        theirs = [cache.inflight[digest] for digest in missing if digest in cache.inflight]
        mine = {digest: size for digest, size in missing.items() if digest not in cache.inflight}
        loop = asyncio.get_running_loop()
        for digest in mine:
            cache.inflight[digest] = loop.create_future()
        try:
            fetched += await _download(stub, context_digest, mine, cache, on_bytes, uses)
        finally:
            for digest in mine:
                cache.inflight.pop(digest).set_result(None)
        # another job's fetch may have failed: the next round claims what is still missing.
        # wait(), not gather(): cancelling this job must not cancel the other job's futures
        if theirs:
            await asyncio.wait(theirs)


async def _download(
    stub: agent_pb2_grpc.AgentServiceStub,
    context_digest: str,
    wanted: dict[str, int],
    cache: BlobCache,
    on_bytes: Callable[[int], None],
    uses: dict[str, tuple[int, int]],
) -> int:
    if not wanted:
        return 0
    starts = await asyncio.to_thread(
        lambda: {digest: cache.resume_point(digest, size) for digest, size in wanted.items()}
    )
    pending: dict[str, tuple[int, int, _Hash]] = {}
    for digest, start in starts.items():
        if start is not None:  # None: a complete partial verified locally
            pending[digest] = (wanted[digest], *start)
    digests = list(pending)
    for first in range(0, len(digests), MAX_RANGES_PER_REQUEST):
        batch = {d: pending[d] for d in digests[first : first + MAX_RANGES_PER_REQUEST]}
        await _stream(stub, context_digest, batch, cache, on_bytes, uses)
    return len(pending)


async def _stream(
    stub: agent_pb2_grpc.AgentServiceStub,
    context_digest: str,
    batch: dict[str, tuple[int, int, _Hash]],
    cache: BlobCache,
    on_bytes: Callable[[int], None],
    uses: dict[str, tuple[int, int]],
) -> None:
    """One FetchBlobs call: each blob is a chunk with its digest, then chunks continuing it."""
    ranges = [
        common_pb2.BlobRange(digest=digest, size=size, offset=offset)
        for digest, (size, offset, _) in batch.items()
    ]
    request = agent_pb2.FetchBlobsRequest(context_digest=context_digest, blobs=ranges)
    writer: BlobWriter | None = None
    call = stub.FetchBlobs(request)
    try:
        async for chunk in call:
            if chunk.digest:
                if writer is not None:
                    raise _failed(
                        f"blob {writer.digest} stopped at {writer.written} of {writer.size} "
                        f"bytes when blob {chunk.digest} began"
                    )
                expected = batch.pop(chunk.digest, None)
                if expected is None:
                    raise _failed(f"the coordinator sent blob {chunk.digest}, which was not "
                                  "asked for or came twice")  # fmt: skip
                size, offset, hasher = expected
                if (chunk.size, chunk.offset) != (size, offset):
                    raise _failed(
                        f"blob {chunk.digest} came as {chunk.size} bytes from offset "
                        f"{chunk.offset}; asked for {size} bytes from offset {offset}"
                    )
                writer = cache.open_writer(chunk.digest, size, offset, hasher)
            elif writer is None:
                raise _failed("a blob chunk without a digest came before any blob began")
            if chunk.data:
                if len(chunk.data) >= _THREAD_WRITE_BYTES:
                    await asyncio.to_thread(writer.write, chunk.data)
                else:
                    writer.write(chunk.data)
                on_bytes(len(chunk.data))
            if writer.complete:
                done, writer = writer, None
                done.commit(uses.get(done.digest))  # hashed as it landed: no re-read
        if writer is not None:
            raise _failed(f"the blob stream ended in blob {writer.digest} at {writer.written} "
                          f"of {writer.size} bytes")  # fmt: skip
        if batch:
            raise _failed(
                f"the coordinator did not send {len(batch)} blob(s), e.g. {next(iter(batch))}"
            )
    finally:
        if writer is not None:
            writer.close(keep=True)  # what landed is the next attempt's resume point
        call.cancel()  # a stream abandoned part way stops at the coordinator too

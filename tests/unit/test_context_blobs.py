"""Manifest contexts on the coordinator: manifests, missing blobs, resumable verified blob uploads,
agents' blob reads, and their garbage collection, on a real ContextStore."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from polyarch.coordinator.contexts.blob_uploads import BlobReceiver, UploadReport
from polyarch.coordinator.contexts.blobs import CHUNK_SIZE, BlobPiece, StoredBlob
from polyarch.coordinator.contexts.gc import ContextCollector
from polyarch.coordinator.contexts.store import ContextStore
from polyarch.coordinator.core.model import (
    InvalidRequest,
    LimitExceeded,
    NotFound,
    PermissionDenied,
)
from polyarch.coordinator.limits import Limits
from polyarch.proto.context_manifest import ContextManifest, ManifestEntry

DAY = 86400.0
MIB = 1 << 20
LIMITS = Limits(upload_deadline_seconds=3600, context_gc_max_total_bytes=1 << 40)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_of(files: dict[str, bytes]) -> ContextManifest:
    """A manifest of `files` (paths with '/' get their directories), mode 0644, mtime 1."""
    entries: dict[str, ManifestEntry] = {}
    for path, data in files.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            entries[folder] = ManifestEntry(folder, "dir", 0o755, 1)
        entries[path] = ManifestEntry(path, "file", 0o644, 1, len(data), sha(data))
    return ContextManifest.from_entries(entries.values())


async def stream(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def pieces(*items: BlobPiece, then: BaseException | None = None) -> AsyncIterator[BlobPiece]:
    for item in items:
        yield item
    if then is not None:
        raise then


def whole(data: bytes, offset: int = 0, chunk: int = CHUNK_SIZE) -> list[BlobPiece]:
    """One blob as a client sends it: a header piece, then continuation pieces."""
    out = []
    for start in range(offset, max(len(data), offset + 1), chunk):
        part = data[start : start + chunk]
        header = start == offset
        out.append(BlobPiece(sha(data) if header else "", len(data) if header else 0,
                             offset if header else 0, part))  # fmt: skip
    return out


async def upload_manifest(store: ContextStore, manifest: ContextManifest) -> tuple[int, int]:
    data = manifest.encode()
    receipt = await store.write_manifest(manifest.digest, len(data), stream(data))
    return receipt.missing_blobs, receipt.missing_bytes


async def send(store: ContextStore, manifest: ContextManifest, *items: BlobPiece) -> UploadReport:
    listing = await store.upload_target(manifest.digest)
    return await BlobReceiver(store, manifest.digest, listing.blobs).receive(pieces(*items))


@pytest.fixture
def store(tmp_path: Path) -> ContextStore:
    return ContextStore(tmp_path, LIMITS)


BIG = os.urandom(3 * CHUNK_SIZE + 5)  # the chunked, resumable path
FILES = {"Dockerfile": b"FROM scratch\n", "src/a.py": b"print(1)\n", "src/big.bin": BIG,
         "src/empty": b"", "src/same.py": b"print(1)\n"}  # fmt: skip


async def test_a_manifest_context_is_present_once_every_blob_is_uploaded(
    store: ContextStore,
) -> None:
    manifest = manifest_of(FILES)
    digest = manifest.digest
    assert await upload_manifest(store, manifest) == (4, len(BIG) + 22)
    assert store.size_of(digest) is None and store.kind_of(digest) is None
    with pytest.raises(NotFound, match=r"is missing 4 files \(\d+ bytes\); upload them"):
        store.require(digest)
    missing = await store.missing_blobs(digest)
    assert missing == [(blob, size, 0) for blob, size in manifest.blobs.items()]
    report = await send(store, manifest, *whole(b"FROM scratch\n"), *whole(b"print(1)\n"),
                        *whole(BIG), *whole(b""))  # fmt: skip
    assert (report.stored_blobs, report.stored_bytes) == (4, len(BIG) + 22)
    assert (report.missing_blobs, report.missing_bytes) == (0, 0)
    assert store.size_of(digest) == len(manifest.encode())
    assert store.kind_of(digest) == "manifest"
    store.require(digest)
    assert b"".join([chunk async for chunk in store.read(digest)]) == manifest.encode()
    for blob in manifest.blobs:
        data = store.blobs.path_for(blob).read_bytes()
        assert sha(data) == blob
    assert store.stored_bytes == len(manifest.encode()) + len(BIG) + 22
    assert os.listdir(store.root / "tmp") == [] and os.listdir(store.root / "partial") == []
    # the same manifest again: already present, nothing read
    receipt = await store.write_manifest(digest, len(manifest.encode()), stream())
    assert receipt.already_present


async def test_a_manifest_of_stored_blobs_commits_at_once_and_protects_them(
    store: ContextStore,
) -> None:
    first = manifest_of({"a": b"one", "b": b"two"})
    await upload_manifest(store, first)
    await send(store, first, *whole(b"one"), *whole(b"two"))
    old = time.time() - 10 * DAY
    os.utime(store.blobs.path_for(sha(b"one")), (old, old))
    second = manifest_of({"c/a": b"one"})
    assert await upload_manifest(store, second) == (0, 0)
    assert store.kind_of(second.digest) == "manifest"
    # the upload touched the blob it relies on: a collector's grace period starts again
    assert store.blobs.path_for(sha(b"one")).stat().st_mtime > time.time() - 60


async def test_a_broken_stream_keeps_the_partial_and_the_upload_resumes(
    store: ContextStore,
) -> None:
    manifest = manifest_of({"big": BIG})
    await upload_manifest(store, manifest)
    sent = whole(BIG)
    with pytest.raises(ConnectionError):
        await send_broken(store, manifest, sent[:2])
    [(blob, size, offset)] = await store.missing_blobs(manifest.digest)
    assert (blob, size, offset) == (sha(BIG), len(BIG), 2 * CHUNK_SIZE)
    report = await send(store, manifest, *whole(BIG, offset=offset))
    assert (report.stored_blobs, report.missing_blobs) == (1, 0)
    assert store.blobs.path_for(sha(BIG)).read_bytes() == BIG
    assert os.listdir(store.root / "partial") == []


async def send_broken(
    store: ContextStore, manifest: ContextManifest, items: list[BlobPiece]
) -> UploadReport:
    listing = await store.upload_target(manifest.digest)
    receiver = BlobReceiver(store, manifest.digest, listing.blobs)
    return await receiver.receive(pieces(*items, then=ConnectionError("client gone")))


async def test_a_resume_at_another_offset_is_refused_and_offset_zero_restarts(
    store: ContextStore,
) -> None:
    manifest = manifest_of({"big": BIG})
    await upload_manifest(store, manifest)
    with pytest.raises(ConnectionError):
        await send_broken(store, manifest, whole(BIG)[:1])
    wrong = CHUNK_SIZE + 7
    with pytest.raises(InvalidRequest) as refused:
        await send(store, manifest, *whole(BIG, offset=wrong))
    assert f"resumes at offset {wrong}" in str(refused.value)
    assert f"holds {CHUNK_SIZE} bytes" in str(refused.value)
    assert store.blobs.partial_size(sha(BIG)) == CHUNK_SIZE  # the refusal kept it
    report = await send(store, manifest, *whole(BIG))
    assert report.stored_blobs == 1 and store.blobs.path_for(sha(BIG)).read_bytes() == BIG


async def test_a_tampered_blob_is_refused_naming_it_and_not_stored(store: ContextStore) -> None:
    manifest = manifest_of({"dir/small.txt": b"honest", "dir/big.bin": BIG})
    await upload_manifest(store, manifest)
    forged = BlobPiece(sha(b"honest"), 6, 0, b"forged")
    with pytest.raises(InvalidRequest) as small:
        await send(store, manifest, forged)
    assert sha(b"honest") in str(small.value) and "'dir/small.txt'" in str(small.value)
    assert sha(b"forged") in str(small.value)
    tampered = bytearray(BIG)
    tampered[-1] ^= 1
    with pytest.raises(InvalidRequest) as big:
        swapped = [replace(p, digest=sha(BIG)) if p.digest else p for p in whole(bytes(tampered))]
        await send(store, manifest, *swapped)
    assert sha(BIG) in str(big.value) and "'dir/big.bin'" in str(big.value)
    assert not store.blobs.present(sha(BIG)) and not store.blobs.present(sha(b"honest"))
    assert os.listdir(store.root / "partial") == [] and os.listdir(store.root / "tmp") == []
    assert await store.settle(manifest.digest) == (2, 6 + len(BIG))


async def test_blobs_the_manifest_does_not_list_or_sizes_it_does_not_say_are_refused(
    store: ContextStore,
) -> None:
    manifest = manifest_of({"a": b"listed"})
    await upload_manifest(store, manifest)
    with pytest.raises(InvalidRequest, match=f"blob {sha(b'other')} is not listed by context"):
        await send(store, manifest, *whole(b"other"))
    with pytest.raises(InvalidRequest, match="is listed with 6 bytes, not 7"):
        await send(store, manifest, BlobPiece(sha(b"listed"), 7, 0, b"listed!"))
    with pytest.raises(InvalidRequest, match="first blob chunk must name"):
        await send(store, manifest, BlobPiece("", 0, 0, b"x"))
    assert not store.blobs.present(sha(b"other"))


async def test_bytes_past_a_blobs_size_are_refused_before_they_are_written(
    store: ContextStore,
) -> None:
    manifest = manifest_of({"big": BIG})
    await upload_manifest(store, manifest)
    extra = [*whole(BIG), BlobPiece("", 0, 0, b"one byte too many")]
    with pytest.raises(InvalidRequest, match=f"exceeds its declared size {len(BIG)}"):
        await send(store, manifest, *extra)
    assert store.blobs.path_for(sha(BIG)).read_bytes() == BIG  # complete before the excess
    small = manifest_of({"b": b"abc"})
    await upload_manifest(store, small)
    with pytest.raises(InvalidRequest, match="exceeds its declared size 3"):
        await send(store, small, BlobPiece(sha(b"abc"), 3, 0, b"abcd"))
    assert not store.blobs.present(sha(b"abc"))


async def test_manifests_over_the_limits_are_refused_naming_the_limit(tmp_path: Path) -> None:
    limits = Limits(max_manifest_bytes=4096, max_context_entries=3, max_context_bytes=100)
    store = ContextStore(tmp_path, limits)
    with pytest.raises(LimitExceeded, match="over the limit max_manifest_bytes=4096"):
        await store.write_manifest("sha256:" + "a" * 64, 4097, stream())
    many = manifest_of({f"f{i}": bytes([i]) for i in range(4)})
    with pytest.raises(
        LimitExceeded, match="lists 4 entries: over the limit max_context_entries=3"
    ):
        await upload_manifest(store, many)
    large = manifest_of({"a": b"x" * 60, "b": b"y" * 60})
    with pytest.raises(
        LimitExceeded, match="120 bytes in all: over the limit max_context_bytes=100"
    ):
        await upload_manifest(store, large)
    escape = ManifestEntry("../x", "dir", 0o755, 1)
    data = ContextManifest((escape,)).encode()  # the constructor does not validate
    with pytest.raises(InvalidRequest, match=r"entry '\.\./x' has a '\.\.' component"):
        await store.write_manifest(sha(data), len(data), stream(data))
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "pending") == []


async def test_a_blob_over_a_limit_lowered_since_its_manifest_came_is_refused(
    store: ContextStore,
) -> None:
    manifest = manifest_of({"big": BIG})
    await upload_manifest(store, manifest)
    store.limits = Limits(max_context_bytes=MIB)
    with pytest.raises(
        LimitExceeded, match=f"{len(BIG)} bytes is over the limit max_context_bytes={MIB}"
    ):
        await send(store, manifest, *whole(BIG))
    assert not store.blobs.present(sha(BIG)) and os.listdir(store.root / "partial") == []


async def test_many_small_blobs_in_one_stream_are_each_verified_and_stored(
    store: ContextStore,
) -> None:
    files = {f"d/f{i:04d}": os.urandom(i % 7 * 1000) + i.to_bytes(2, "big") for i in range(700)}
    manifest = manifest_of(files)
    assert (await upload_manifest(store, manifest))[0] == 700
    report = await send(store, manifest, *[p for data in files.values() for p in whole(data)])
    assert (report.stored_blobs, report.missing_blobs) == (700, 0)
    assert all(store.blobs.path_for(sha(data)).read_bytes() == data for data in files.values())
    assert os.listdir(store.root / "tmp") == []


async def test_two_streams_sending_the_same_blob_store_one_correct_copy(
    store: ContextStore,
) -> None:
    manifest = manifest_of({"big": BIG, "small": b"tiny"})
    await upload_manifest(store, manifest)
    gate = asyncio.Event()

    async def slow(items: list[BlobPiece]) -> AsyncIterator[BlobPiece]:
        yield items[0]
        await gate.wait()  # the other stream starts the same blob meanwhile
        for item in items[1:]:
            yield item

    listing = await store.upload_target(manifest.digest)
    first = BlobReceiver(store, manifest.digest, listing.blobs)
    second = BlobReceiver(store, manifest.digest, listing.blobs)
    one = asyncio.create_task(first.receive(slow([*whole(b"tiny"), *whole(BIG)])))
    two = asyncio.create_task(second.receive(pieces(*whole(BIG), *whole(b"tiny"))))
    await asyncio.sleep(0)
    gate.set()
    reports = await asyncio.gather(one, two)
    assert sum(r.stored_blobs for r in reports) == 2
    assert sum(r.discarded_blobs for r in reports) == 2
    assert store.blobs.path_for(sha(BIG)).read_bytes() == BIG
    assert store.kind_of(manifest.digest) == "manifest"
    assert store.blobs.stored_bytes == len(BIG) + 4


async def test_agents_read_listed_blobs_from_their_offsets(store: ContextStore) -> None:
    manifest = manifest_of(FILES)
    await upload_manifest(store, manifest)
    await send(store, manifest, *whole(b"FROM scratch\n"), *whole(b"print(1)\n"), *whole(BIG),
               *whole(b""))  # fmt: skip
    ranges = await store.fetch_ranges(
        manifest.digest, [(sha(BIG), 0, 5), (sha(b"print(1)\n"), 9, 0), (sha(b""), 0, 0)]
    )
    got: dict[str, bytearray] = {}
    current = ""
    async for piece in store.blobs.read(ranges):
        if piece.digest:
            current = piece.digest
            got[current] = bytearray()
        got[current] += piece.data
    assert got == {sha(BIG): bytearray(BIG[5:]), sha(b"print(1)\n"): bytearray(b"print(1)\n"),
                   sha(b""): bytearray()}  # fmt: skip
    with pytest.raises(PermissionDenied, match=f"blob '{sha(b'secret')}' is not listed"):
        await store.fetch_ranges(manifest.digest, [(sha(b"secret"), 6, 0)])
    with pytest.raises(InvalidRequest, match="offset 10 is outside its 9 bytes"):
        await store.fetch_ranges(manifest.digest, [(sha(b"print(1)\n"), 0, 10)])
    pending = manifest_of({"new": b"not yet"})
    await upload_manifest(store, pending)
    with pytest.raises(NotFound, match="still missing files"):
        await store.fetch_ranges(pending.digest, [])


# ---- garbage collection ------------------------------------------------------------------


def age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


async def committed(store: ContextStore, files: dict[str, bytes]) -> ContextManifest:
    manifest = manifest_of(files)
    await upload_manifest(store, manifest)
    await send(store, manifest, *[p for data in set(files.values()) for p in whole(data)])
    assert store.kind_of(manifest.digest) == "manifest"
    return manifest


def blob_names(store: ContextStore) -> set[str]:
    return {"sha256:" + name for name in os.listdir(store.root / "blobs")}


async def test_gc_keeps_listed_blobs_and_drops_unlisted_old_ones_and_stale_uploads(
    store: ContextStore,
) -> None:
    busy = await committed(store, {"shared": b"shared", "mine": b"busy's own"})
    old = await committed(store, {"shared": b"shared", "gone": b"old's own"})
    pending = manifest_of({"p": b"pending's own", "q": b"never sent"})
    await upload_manifest(store, pending)
    await send(store, pending, *whole(b"pending's own"))
    stray = await committed(store, {"s": b"stray"})
    for manifest in (busy, old, stray):
        age(store.manifests.path_for(manifest.digest, "committed"), 10 * DAY)
    age(store.manifests.path_for(pending.digest, "pending"), 2 * 3600)
    for blob in blob_names(store):
        age(store.blobs.path_for(blob), 2 * 3600)
    young = await committed(store, {"y": b"young"})
    # the stray's manifest was collected already: its blob is listed by nothing
    store.manifests.path_for(stray.digest, "committed").unlink()
    store.manifests.scan()
    fresh_partial, stale_partial = (
        store.root / "partial" / ("a" * 64),
        store.root / "partial" / ("b" * 64),
    )
    fresh_partial.write_bytes(b"resumable")
    stale_partial.write_bytes(b"abandoned")
    age(stale_partial, 2 * 3600)

    deleted: list[tuple[int, int]] = []
    collector = ContextCollector(store, lambda: {busy.digest}, lambda n, s: deleted.append((n, s)))
    report = await collector.collect()

    assert (report.deleted, report.blobs_deleted, report.pending_expired) == (1, 3, 1)
    assert report.temp_files_removed == 1 and os.listdir(store.root / "partial") == ["a" * 64]
    assert store.kind_of(old.digest) is None and store.manifests.state_of(pending.digest) is None
    assert blob_names(store) == {sha(b"shared"), sha(b"busy's own"), sha(b"young")}
    assert store.kind_of(busy.digest) == "manifest" and store.kind_of(young.digest) == "manifest"
    manifest_bytes = len(busy.encode()) + len(young.encode())
    assert store.stored_bytes == manifest_bytes + 6 + 10 + 5 == report.kept_bytes
    freed = len(old.encode()) + len(pending.encode()) + len(b"old's own") + 13 + 5
    assert deleted == [(1, freed)] and report.deleted_bytes == freed
    assert os.listdir(store.root / "tmp") == []


async def test_a_blob_a_new_manifest_lists_survives_a_pass_that_counted_before_it(
    store: ContextStore,
) -> None:
    gone = await committed(store, {"a": b"reused"})
    age(store.blobs.path_for(sha(b"reused")), 2 * 3600)
    age(store.manifests.path_for(gone.digest, "committed"), 10 * DAY)
    delete = store.blobs.delete_unprotected

    def after_a_late_manifest(blobs: list[StoredBlob], cutoff: float) -> tuple[int, int]:
        # a client uploads a manifest listing the blob after the collector counted references
        # (outside the guard here only because this runs inside the collector's own hold)
        assert store.blobs.touch_missing({sha(b"reused"): 6}) == {}
        return delete(blobs, cutoff)

    store.blobs.delete_unprotected = after_a_late_manifest  # type: ignore[method-assign]
    report = await ContextCollector(store, set).collect()
    assert report.deleted == 1 and report.blobs_deleted == 0
    assert store.blobs.present(sha(b"reused"))


async def test_the_total_rule_frees_only_the_blobs_no_kept_manifest_lists(tmp_path: Path) -> None:
    store = ContextStore(tmp_path, Limits(upload_deadline_seconds=3600))
    first = await committed(store, {"a": b"s" * 1000, "b": b"1" * 500})
    second = await committed(store, {"a": b"s" * 1000, "c": b"2" * 500})
    age(store.manifests.path_for(first.digest, "committed"), 2 * DAY)
    age(store.manifests.path_for(second.digest, "committed"), 1 * DAY)
    for blob in blob_names(store):
        age(store.blobs.path_for(blob), 2 * 3600)
    total = store.stored_bytes
    # over the total by one byte: deleting the older manifest (and its own blob) is enough
    limits = Limits(upload_deadline_seconds=3600, context_gc_max_total_bytes=total - 1)
    store.limits = limits
    report = await ContextCollector(store, set).collect()
    assert report.deleted == 1 and report.blobs_deleted == 1
    assert store.kind_of(second.digest) == "manifest" and store.kind_of(first.digest) is None
    assert blob_names(store) == {sha(b"s" * 1000), sha(b"2" * 500)}
    assert store.stored_bytes == total - len(first.encode()) - 500

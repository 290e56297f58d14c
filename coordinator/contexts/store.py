"""Build contexts on disk, content-addressed by sha256: tars, and manifests with file blobs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from polyarch.coordinator.contexts.blobs import BlobStore
from polyarch.coordinator.contexts.manifests import Listing, ManifestStore, State, StoredManifest
from polyarch.coordinator.contexts.uploads import UploadSlots
from polyarch.coordinator.core.model import (
    InvalidRequest,
    LimitExceeded,
    NotFound,
    PermissionDenied,
)
from polyarch.coordinator.limits import Limits
from polyarch.proto.context_manifest import ContextManifest, ManifestError

CHUNK_SIZE = 1 << 20
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NO_LIMIT = 1 << 62
# How long MissingBlobs waits for a claimed blob: a stream that just broke lets go within
# a write; one still sending it keeps it, and its offset then is as good as any.
_SETTLE_SECONDS = 2.0
Kind = Literal["tar", "manifest"]


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
    kind: Kind = "tar"  # a manifest's size is the manifest's own; its blobs are shared


@dataclass(frozen=True)
class ManifestReceipt:
    """What an uploaded manifest lists, and what of it the coordinator still lacks."""

    already_present: bool
    listed_blobs: int = 0
    listed_bytes: int = 0
    missing_blobs: int = 0
    missing_bytes: int = 0


class ContextStore:
    """Stores each context once: a tar under root/sha256/<hex>, a manifest under
    root/manifests/<hex> (root/pending/<hex> until every blob it lists is in root/blobs/).
    Writes are atomic renames.

    A context's mtime is its "last used" time: set by the upload, moved to now by every
    lookup (a client's stat before submitting, a submit's validation, an agent's fetch),
    so it survives restarts and garbage collection needs no other bookkeeping.
    """

    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root = root
        self.limits = limits or Limits()
        self.uploads = UploadSlots(self.limits)
        self.blobs = BlobStore(root)
        self.manifests = ManifestStore(root)
        # bytes under sha256/: counted by each scan, then kept up to date by writes and removals
        self.tar_bytes = 0
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    @property
    def stored_bytes(self) -> int:
        """Tars, manifests (pending too) and blobs; partial uploads are not counted."""
        return self.tar_bytes + self.manifests.stored_bytes + self.blobs.stored_bytes

    def path_for(self, digest: str) -> Path:
        return self.root / "sha256" / check_digest(digest).removeprefix("sha256:")

    def size_of(self, digest: str) -> int | None:
        """The stored size (a manifest's own for a manifest context), or None when the
        context is not stored or is a manifest still missing blobs. A hit counts as a use."""
        path = self.path_for(digest)
        try:
            os.utime(path)
            return path.stat().st_size
        except FileNotFoundError:
            return self.manifests.size_of(digest)

    def kind_of(self, digest: str) -> Kind | None:
        """What a stored, usable context is; None when it is not (or not yet) one."""
        if self.path_for(digest).exists():
            return "tar"
        return "manifest" if self.manifests.state_of(digest) == "committed" else None

    def require(self, digest: str) -> None:
        """Refuses a context a build cannot use (yet), saying what is missing (blocking: a
        stat per blob not seen stored yet, for a pending manifest)."""
        if self.size_of(digest) is not None:
            return
        if self.manifests.state_of(digest) != "pending":
            raise NotFound(f"context {digest} is not on the coordinator; upload it first")
        listing = self.manifests.cached(digest)
        what = "some of its files"
        if listing is not None and listing.unseen is not None:
            listing.unseen = self.blobs.touch_missing(listing.unseen)
            if not listing.unseen and self.manifests.commit(digest):
                return
            count = len(listing.unseen)
            what = f"{count} file{'s' if count != 1 else ''} ({sum(listing.unseen.values())} bytes)"
        raise NotFound(
            f"context {digest} is missing {what}; upload them (MissingBlobs, UploadBlobs)"
        )

    # ---- tars ----------------------------------------------------------------------------

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
        tmp_name = await self._receive("context", digest, size, chunks)
        try:
            os.replace(tmp_name, target)
            self.tar_bytes += size
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)

    async def _receive(
        self, what: str, digest: str, size: int, chunks: AsyncIterator[bytes]
    ) -> str:
        """A temp file holding exactly `size` bytes whose sha256 is `digest`; the caller
        moves or deletes it."""
        hasher = hashlib.sha256()
        received = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > size:  # before writing a byte of it
                        raise InvalidRequest(f"{what} upload exceeds its declared size {size}")
                    hasher.update(chunk)
                    await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(out.flush)
                await asyncio.to_thread(os.fsync, out.fileno())
            actual = "sha256:" + hasher.hexdigest()
            if received != size or actual != digest:
                raise InvalidRequest(
                    f"{what} upload does not match its digest: declared {digest} "
                    f"({size} bytes), received {actual} ({received} bytes)"
                )
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return tmp_name

    async def read(self, digest: str, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """Streams a stored context (a tar, or a committed manifest's bytes) in chunks."""
        path = self.path_for(digest)
        if not path.exists():
            path = self.manifests.path_for(digest, "committed")
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"context {digest} is not stored on the coordinator") from None
        with handle:
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk

    # ---- manifests -----------------------------------------------------------------------

    async def write_manifest(
        self, digest: str, size: int, chunks: AsyncIterator[bytes]
    ) -> ManifestReceipt:
        """Stores an uploaded manifest as pending, after checking its digest, form and limits;
        commits it at once when every blob it lists is stored. Reads nothing of `chunks`
        when the context is already committed."""
        limits = self.limits
        check_digest(digest)
        if size > limits.max_manifest_bytes:
            raise LimitExceeded(
                f"a context manifest of {size} bytes is over the limit "
                f"max_manifest_bytes={limits.max_manifest_bytes}"
            )
        if self.manifests.size_of(digest) is not None:
            return ManifestReceipt(already_present=True)
        tmp_name = await self._receive("context manifest", digest, size, chunks)
        try:
            manifest = await asyncio.to_thread(self._decode, digest, tmp_name)
            self.manifests.add_pending(digest, tmp_name, manifest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        _, missing = await self._missing(digest)
        return ManifestReceipt(
            False, len(manifest.blobs), manifest.blob_bytes, len(missing), sum(missing.values())
        )

    def _decode(self, digest: str, file_name: str) -> ContextManifest:
        limits = self.limits
        data = Path(file_name).read_bytes()
        entries = data.count(b"\n") - 1
        if entries > limits.max_context_entries:
            raise LimitExceeded(
                f"context manifest {digest} lists {entries} entries: over the limit "
                f"max_context_entries={limits.max_context_entries}"
            )
        try:
            manifest = ContextManifest.decode(data, max_entries=_NO_LIMIT, max_bytes=_NO_LIMIT)
        except ManifestError as exc:
            raise InvalidRequest(f"context manifest {digest} {exc}") from None
        if manifest.total_bytes > limits.max_context_bytes:
            raise LimitExceeded(
                f"context manifest {digest} lists files of {manifest.total_bytes} bytes in all: "
                f"over the limit max_context_bytes={limits.max_context_bytes}"
            )
        return manifest

    async def _missing(self, digest: str) -> tuple[State, dict[str, int]]:
        """The manifest's blobs not stored (touching every stored one, under the blob guard,
        so garbage collection spares them from now on); commits it when none are."""
        state, listing = await self.manifests.listing(digest)
        if state == "committed":
            return state, {}
        unseen = listing.blobs if listing.unseen is None else listing.unseen
        async with self.blobs.guard:
            missing = await asyncio.to_thread(self.blobs.touch_missing, unseen)
        listing.unseen = missing
        if not missing and self.manifests.commit(digest):
            state = "committed"
        return state, missing

    async def missing_blobs(self, digest: str) -> list[tuple[str, int, int]]:
        """(digest, size, offset held) of each blob a manifest lacks, in manifest order."""
        if self.path_for(digest).exists():
            raise InvalidRequest(f"context {digest} was uploaded as a tar: it has no file blobs")
        _, missing = await self._missing(digest)
        await self.blobs.settled(missing, _SETTLE_SECONDS)  # a stream broken just now
        return [(blob, size, self.blobs.partial_size(blob)) for blob, size in missing.items()]

    async def upload_target(self, digest: str) -> Listing:
        """The blob list of a manifest that UploadBlobs may send blobs for."""
        check_digest(digest)
        _, listing = await self.manifests.listing(digest)
        return listing

    async def settle(self, digest: str) -> tuple[int, int]:
        """After blob uploads: (blobs, bytes) still missing; commits the manifest if none."""
        _, missing = await self._missing(digest)
        return len(missing), sum(missing.values())

    async def fetch_ranges(
        self, digest: str, ranges: Iterable[tuple[str, int, int]]
    ) -> list[tuple[str, int, int]]:
        """Checks an agent's (blob, size, offset) requests against a committed manifest
        context: each blob listed by it, offsets within the blob. `size` may be 0 (unsaid).
        Returns them with the listed sizes."""
        state, listing = await self.manifests.listing(check_digest(digest))
        if state != "committed":
            raise NotFound(f"context {digest} is still missing files; it cannot be fetched")
        checked = []
        for blob, size, offset in ranges:
            listed = listing.blobs.get(blob)
            if listed is None:
                raise PermissionDenied(
                    f"blob {blob!r} is not listed by context {digest}: an agent may fetch only "
                    "the blobs of its assignment's context"
                )
            if size not in (0, listed):
                raise InvalidRequest(f"blob {blob} is listed with {listed} bytes, not {size}")
            if not 0 <= offset <= listed:
                raise InvalidRequest(f"blob {blob}: offset {offset} is outside its {listed} bytes")
            checked.append((blob, listed, offset))
        return checked

    # ---- garbage collection --------------------------------------------------------------

    def scan(self) -> list[StoredContext]:
        """Every stored tar and committed manifest (blocking: run it in a thread); also
        recounts stored_bytes but for the blobs."""
        found = self.scan_tars()
        for item in self.manifests.scan():
            if item.state == "committed":
                found.append(StoredContext(item.digest, item.size, item.mtime, "manifest"))
        return found

    def scan_tars(self) -> list[StoredContext]:
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
        self.tar_bytes = sum(item.size for item in found)
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
        if item.kind == "manifest":
            stored = StoredManifest(item.digest, "committed", item.size, item.last_used)
            return self.manifests.detach(stored)
        path = self.path_for(item.digest)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if stat.st_mtime > item.last_used:
            return None
        doomed = self.root / "tmp" / f"gc-{path.name}"
        os.replace(path, doomed)
        self.tar_bytes -= stat.st_size
        return doomed

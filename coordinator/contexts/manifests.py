"""Context manifests on disk: pending (blobs missing) and committed, and their blob lists cached."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from polyarch.coordinator.contexts.blobs import blob_hex, is_blob_hex
from polyarch.coordinator.core.model import NotFound
from polyarch.proto.context_manifest import ContextManifest, ManifestError

State = Literal["pending", "committed"]
# Cached blob lists hold at most this many blobs in all (~250 bytes of memory each).
CACHED_BLOBS = 200_000
# A stored manifest was validated on upload; limits lowered since must not make it unreadable.
_NO_LIMIT = 1 << 62
# In a canonical manifest this only ever matches a file's digest key: quotes inside JSON
# strings (paths, targets) are escaped.
_DIGEST_KEY = re.compile(rb'"digest":"sha256:([0-9a-f]{64})"')


@dataclass
class Listing:
    """What the coordinator needs of a manifest to serve it: its blobs, and (pending only) the
    ones not yet seen stored, a superset of the missing: present ones are dropped on a check."""

    blobs: dict[str, int]
    unseen: dict[str, int] | None = None  # None: not checked since loaded


@dataclass(frozen=True)
class StoredManifest:
    digest: str
    state: State
    size: int
    mtime: float


class ManifestStore:
    """root/pending/<hex> and root/manifests/<hex>: a manifest whose blobs are not all stored
    yet, and one that is a usable context. Commit is an atomic rename from one to the other.

    A manifest's mtime is its last use, as a tar context's: committed ones are touched by
    lookups, pending ones by every MissingBlobs and UploadBlobs of their upload.
    """

    def __init__(self, root: Path) -> None:
        self.pending_dir = root / "pending"
        self.committed_dir = root / "manifests"
        self.stored_bytes = 0  # both folders; counted by scan(), then kept up to date
        self._cache: OrderedDict[str, Listing] = OrderedDict()
        self._cached_blobs = 0
        for folder in (self.pending_dir, self.committed_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str, state: State) -> Path:
        folder = self.committed_dir if state == "committed" else self.pending_dir
        return folder / blob_hex(digest)

    def state_of(self, digest: str, touch: bool = False) -> State | None:
        """Committed, pending or None (committed wins a race with a commit in flight)."""
        for state in ("committed", "pending"):
            path = self.path_for(digest, state)
            try:
                if touch:
                    os.utime(path)
                elif not path.exists():
                    continue
                return state
            except FileNotFoundError:
                continue
        return None

    def size_of(self, digest: str) -> int | None:
        """A committed manifest's size in bytes (a hit counts as a use), else None."""
        path = self.path_for(digest, "committed")
        try:
            os.utime(path)
            return path.stat().st_size
        except FileNotFoundError:
            return None

    # ---- writes (on the event loop: single syscalls) --------------------------------------

    def add_pending(self, digest: str, verified_file: str, manifest: ContextManifest) -> None:
        """Moves a verified, decoded upload into pending/ (replacing an identical one), unless
        a concurrent upload of it was committed meanwhile."""
        if self.path_for(digest, "committed").exists():
            return
        target = self.path_for(digest, "pending")
        existed = target.exists()
        os.replace(verified_file, target)
        if not existed:
            self.stored_bytes += target.stat().st_size
        self.remember(digest, Listing(dict(manifest.blobs)))

    def commit(self, digest: str) -> bool:
        """pending -> committed; False when the pending manifest is gone (expired, or
        committed by another stream meanwhile: the caller checks state_of)."""
        pending, committed = self.path_for(digest, "pending"), self.path_for(digest, "committed")
        try:
            if committed.exists():  # an identical copy: keep one
                size = pending.stat().st_size
                pending.unlink()
                self.stored_bytes -= size
            else:
                os.replace(pending, committed)
        except FileNotFoundError:
            return False
        listing = self._cache.get(digest)
        if listing is not None:
            listing.unseen = {}
        return True

    # ---- cached blob lists ----------------------------------------------------------------

    async def listing(self, digest: str) -> tuple[State, Listing]:
        """The manifest's state and blob list (read and decoded on a cache miss)."""
        state = self.state_of(digest, touch=True)
        if state is None:
            self.forget(digest)
            raise NotFound(
                f"context manifest {digest} is not on the coordinator: upload it first "
                "(UploadContext with kind MANIFEST)"
            )
        listing = self._cache.get(digest)
        if listing is None:
            manifest = await asyncio.to_thread(self._load, digest, state)
            listing = Listing(dict(manifest.blobs))
            self.remember(digest, listing)
        else:
            self._cache.move_to_end(digest)
        if state == "committed":
            listing.unseen = {}
        return state, listing

    def _load(self, digest: str, state: State) -> ContextManifest:
        try:
            data = self.path_for(digest, state).read_bytes()
        except FileNotFoundError:
            # committed meanwhile, or collected: the other folder, or a clear miss
            other: State = "committed" if state == "pending" else "pending"
            try:
                data = self.path_for(digest, other).read_bytes()
            except FileNotFoundError:
                raise NotFound(f"context manifest {digest} is not on the coordinator") from None
        try:
            return ContextManifest.decode(data, max_entries=_NO_LIMIT, max_bytes=_NO_LIMIT)
        except ManifestError as exc:  # a stored file changed under us: not the caller's fault
            raise RuntimeError(f"stored context manifest {digest} is corrupt: {exc}") from exc

    def cached(self, digest: str) -> Listing | None:
        return self._cache.get(digest)

    def remember(self, digest: str, listing: Listing) -> None:
        self.forget(digest)
        if len(listing.blobs) > CACHED_BLOBS:
            return  # read again on each use rather than evict everything else
        self._cache[digest] = listing
        self._cached_blobs += len(listing.blobs)
        while self._cached_blobs > CACHED_BLOBS:
            _, evicted = self._cache.popitem(last=False)
            self._cached_blobs -= len(evicted.blobs)

    def forget(self, digest: str) -> None:
        listing = self._cache.pop(digest, None)
        if listing is not None:
            self._cached_blobs -= len(listing.blobs)

    def path_of_blob(self, digest: str, blob_digest: str) -> str:
        """A path the manifest gives `blob_digest`, for error messages (blocking)."""
        needle = f'"digest":"{blob_digest}"'.encode()
        for state in ("committed", "pending"):
            with contextlib.suppress(FileNotFoundError):
                data = self.path_for(digest, state).read_bytes()
                at = data.find(needle)
                if at < 0:
                    return "?"
                line = data[data.rfind(b"\n", 0, at) + 1 : data.find(b"\n", at)]
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    return str(json.loads(line)["path"])
        return "?"

    # ---- garbage collection (blocking: run in a thread, except where said) ----------------

    def scan(self) -> list[StoredManifest]:
        """Every stored manifest, pending ones first; also recounts stored_bytes. Listing
        pending/ before manifests/ means a commit racing the scan is seen at least once."""
        found = []
        for state in ("pending", "committed"):
            folder = self.pending_dir if state == "pending" else self.committed_dir
            for entry in os.scandir(folder):
                if not is_blob_hex(entry.name):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    found.append(StoredManifest("sha256:" + entry.name, state, stat.st_size,
                                                stat.st_mtime))  # fmt: skip
        self.stored_bytes = sum(item.size for item in found)
        return found

    def blob_hexes(self, digest: str) -> set[str]:
        """The hex digests of the blobs a stored manifest lists (a regex over the file, no
        decoding: it was validated when uploaded); empty if it is gone."""
        for state in ("committed", "pending"):
            with contextlib.suppress(FileNotFoundError):
                data = self.path_for(digest, state).read_bytes()
                return {match.decode() for match in _DIGEST_KEY.findall(data)}
        return set()

    def detach(self, item: StoredManifest, used_since: bool = True) -> Path | None:
        """Takes `item` out of the store (on the event loop) unless it was used since it was
        scanned (when `used_since`); returns the file to delete."""
        path = self.path_for(item.digest, item.state)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if used_since and stat.st_mtime > item.mtime:
            return None
        doomed = path.parent.parent / "tmp" / f"gc-{item.state}-{path.name}"
        os.replace(path, doomed)
        self.stored_bytes -= stat.st_size
        self.forget(item.digest)
        return doomed

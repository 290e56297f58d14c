"""Garbage collection of build contexts no unfinished build uses (too old, or too many bytes),
of the file blobs no manifest lists any more, and of uploads left unfinished."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from polyarch.coordinator.contexts.blobs import StoredBlob
from polyarch.coordinator.contexts.manifests import ManifestStore, StoredManifest
from polyarch.coordinator.contexts.store import ContextStore, StoredContext

if TYPE_CHECKING:  # ledger -> convert -> fleet -> ledger is a cycle when imported first
    from polyarch.coordinator.core.ledger import BuildLedger

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 600.0
_BLOB_SLICE = 1000  # blob deletions per hold of the blob guard (manifest uploads wait for it)


def select_for_deletion(
    entries: Iterable[StoredContext],
    in_use: set[str],
    now: float,
    max_age: float,
    max_total_bytes: int,
    shared_bytes: int = 0,
    release: Callable[[StoredContext], int] = lambda item: 0,
) -> list[StoredContext]:
    """Which contexts to delete, in order: every unused one last used more than `max_age`
    seconds before `now`, then unused ones oldest first while the total of all stored
    bytes (those in use included: they take disk too) is over `max_total_bytes`.

    `shared_bytes` are stored bytes no entry owns alone (manifests' file blobs), counted in
    the total; `release(item)` says how many of them choosing `item` frees.
    A context in `in_use` is never chosen, even if that leaves the total over the limit.
    Ties in age go by digest, so the choice is the same on every run.
    """
    stored = sorted(entries, key=lambda item: (item.last_used, item.digest))
    total = sum(item.size for item in stored) + shared_bytes
    chosen: list[StoredContext] = []
    kept: list[StoredContext] = []
    for item in stored:
        if item.digest not in in_use and now - item.last_used > max_age:
            chosen.append(item)
            total -= item.size + release(item)
        else:
            kept.append(item)
    for item in kept:
        if total <= max_total_bytes:
            break
        if item.digest not in in_use:
            chosen.append(item)
            total -= item.size + release(item)
    return chosen


class BlobReferences:
    """How many stored manifests list each blob (blocking: built and used in threads).

    A blob is deleted when no manifest lists it and it was not touched within the grace
    period (an upload or a manifest listing it since the cutoff): that covers manifests
    uploaded after the count was taken.
    """

    def __init__(
        self, manifests: ManifestStore, listed: Iterable[StoredManifest],
        blobs: Iterable[StoredBlob], cutoff: float,
    ) -> None:  # fmt: skip
        self.manifests = manifests
        self.cutoff = cutoff
        self.blobs = {blob.hex: blob for blob in blobs}
        self.counts: Counter[str] = Counter()
        for item in listed:
            self.counts.update(manifests.blob_hexes(item.digest))

    def _old(self, hex_digest: str) -> StoredBlob | None:
        blob = self.blobs.get(hex_digest)
        return blob if blob is not None and blob.mtime < self.cutoff else None

    def shared_bytes(self) -> int:
        """The blobs' bytes but those that go anyway (listed by none, and old)."""
        return sum(b.size for h, b in self.blobs.items() if self.counts[h] > 0 or not self._old(h))

    def release(self, item: StoredContext) -> int:
        """Counts `item`'s blobs down; returns the bytes of those it was the last to list."""
        if item.kind != "manifest":
            return 0
        freed = 0
        for hex_digest in self.manifests.blob_hexes(item.digest):
            self.counts[hex_digest] -= 1
            blob = self._old(hex_digest) if self.counts[hex_digest] <= 0 else None
            freed += blob.size if blob is not None else 0
        return freed

    def restore(self, item: StoredContext) -> None:
        """Undoes release() for a context that was chosen but could not be deleted."""
        if item.kind == "manifest":
            self.counts.update(self.manifests.blob_hexes(item.digest))

    def unlisted(self) -> list[StoredBlob]:
        """Old blobs no remaining manifest lists."""
        return [b for h, b in self.blobs.items() if self.counts[h] <= 0 and self._old(h)]


def digests_in_use(ledger: BuildLedger) -> set[str]:
    """The contexts of every queued or running build (the ledger holds exactly those)."""
    return {build.spec.context_digest for build, _ in ledger.active()}


@dataclass(frozen=True)
class CollectionReport:
    deleted: int  # contexts: tars and committed manifests
    deleted_bytes: int  # theirs, the blobs deleted and the pending manifests expired
    kept_bytes: int
    temp_files_removed: int  # stale temp files and partial blob uploads
    blobs_deleted: int = 0
    pending_expired: int = 0


class ContextCollector:
    """Runs select_for_deletion over the store now and then; filesystem work in threads."""

    def __init__(
        self,
        store: ContextStore,
        in_use: Callable[[], set[str]],
        on_deleted: Callable[[int, int], None] = lambda count, size: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.in_use = in_use
        self.on_deleted = on_deleted
        self.clock = clock

    async def collect(self) -> CollectionReport:
        """One pass: scan, choose, then remove each chosen context unless it came into use;
        then the blobs left unlisted. Filesystem work runs in threads."""
        store, limits = self.store, self.store.limits
        cutoff = self.clock() - limits.upload_deadline_seconds
        swept = await asyncio.to_thread(store.sweep_temp_files, self.clock())
        swept += store.blobs.sweep_partials(cutoff)
        manifests = await asyncio.to_thread(store.manifests.scan)
        expired, expired_bytes, listed = 0, 0, []
        for manifest in manifests:
            if manifest.state == "pending" and manifest.mtime < cutoff:
                doomed = store.manifests.detach(manifest)  # unless an upload touched it since
                if doomed is not None:
                    await self._unlink(doomed)
                    expired, expired_bytes = expired + 1, expired_bytes + manifest.size
                    continue
            listed.append(manifest)
        tars = await asyncio.to_thread(store.scan_tars)
        blobs = await asyncio.to_thread(store.blobs.scan)
        references = await asyncio.to_thread(BlobReferences, store.manifests, listed, blobs, cutoff)
        entries = tars + [
            StoredContext(m.digest, m.size, m.mtime, "manifest")
            for m in listed if m.state == "committed"
        ]  # fmt: skip
        chosen = await asyncio.to_thread(
            select_for_deletion, entries, self.in_use(), self.clock(),
            limits.context_gc_max_age_seconds, limits.context_gc_max_total_bytes,
            references.shared_bytes(), references.release,
        )  # fmt: skip
        deleted = deleted_bytes = 0
        for item in chosen:
            # Checked again per item, on the event loop and just before the rename: a build
            # may have been submitted with this context while the scan ran in its thread.
            doomed = None if item.digest in self.in_use() else store.detach(item)
            if doomed is None:
                await asyncio.to_thread(references.restore, item)
                continue
            await self._unlink(doomed)
            deleted += 1
            deleted_bytes += item.size
            log.info("deleted unused context %s (%d bytes)", item.digest, item.size)
        blobs_deleted, blob_bytes = await self._delete_blobs(references.unlisted(), cutoff)
        freed = deleted_bytes + blob_bytes + expired_bytes
        if deleted or blobs_deleted or expired:
            self.on_deleted(deleted, freed)
        return CollectionReport(deleted, freed, store.stored_bytes, swept, blobs_deleted, expired)

    async def _delete_blobs(self, blobs: list[StoredBlob], cutoff: float) -> tuple[int, int]:
        store, count, size = self.store.blobs, 0, 0
        for start in range(0, len(blobs), _BLOB_SLICE):
            async with store.guard:
                deleted = await asyncio.to_thread(
                    store.delete_unprotected, blobs[start : start + _BLOB_SLICE], cutoff
                )
            store.stored_bytes -= deleted[1]
            count, size = count + deleted[0], size + deleted[1]
        return count, size

    @staticmethod
    async def _unlink(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, path)

    async def run(self, interval: float = DEFAULT_INTERVAL) -> None:
        """Collects at once, then every `interval` seconds, until cancelled."""
        while True:
            try:
                report = await self.collect()
                if report.deleted or report.temp_files_removed or report.blobs_deleted:
                    log.info(
                        "context GC: deleted %d contexts, %d file blobs and %d expired "
                        "manifest uploads (%d bytes), and %d stale temp files; %d bytes stored",
                        report.deleted, report.blobs_deleted, report.pending_expired,
                        report.deleted_bytes, report.temp_files_removed, report.kept_bytes,
                    )  # fmt: skip
            except OSError:
                # A full or failing disk must not end the loop: the next pass may succeed.
                log.exception("context GC pass failed")
            await asyncio.sleep(interval)

"""Garbage collection of build contexts no unfinished build uses: too old, or too many bytes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from polyarch.coordinator.contexts.store import ContextStore, StoredContext

if TYPE_CHECKING:  # ledger -> convert -> fleet -> ledger is a cycle when imported first
    from polyarch.coordinator.core.ledger import BuildLedger

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 600.0


def select_for_deletion(
    entries: Iterable[StoredContext],
    in_use: set[str],
    now: float,
    max_age: float,
    max_total_bytes: int,
) -> list[StoredContext]:
    """Which contexts to delete, in order: every unused one last used more than `max_age`
    seconds before `now`, then unused ones oldest first while the total of all stored
    bytes (those in use included: they take disk too) is over `max_total_bytes`.

    A context in `in_use` is never chosen, even if that leaves the total over the limit.
    Ties in age go by digest, so the choice is the same on every run.
    """
    stored = sorted(entries, key=lambda item: (item.last_used, item.digest))
    total = sum(item.size for item in stored)
    chosen: list[StoredContext] = []
    kept: list[StoredContext] = []
    for item in stored:
        if item.digest not in in_use and now - item.last_used > max_age:
            chosen.append(item)
            total -= item.size
        else:
            kept.append(item)
    for item in kept:
        if total <= max_total_bytes:
            break
        if item.digest not in in_use:
            chosen.append(item)
            total -= item.size
    return chosen


def digests_in_use(ledger: BuildLedger) -> set[str]:
    """The contexts of every queued or running build (the ledger holds exactly those)."""
    return {build.spec.context_digest for build, _ in ledger.active()}


@dataclass(frozen=True)
class CollectionReport:
    deleted: int
    deleted_bytes: int
    kept_bytes: int
    temp_files_removed: int


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
        """One pass: scan, choose, then remove each chosen context unless it came into use."""
        limits = self.store.limits
        swept = await asyncio.to_thread(self.store.sweep_temp_files)
        entries = await asyncio.to_thread(self.store.scan)
        chosen = select_for_deletion(
            entries, self.in_use(), self.clock(),
            limits.context_gc_max_age_seconds, limits.context_gc_max_total_bytes,
        )  # fmt: skip
        deleted = deleted_bytes = 0
        for item in chosen:
            # Checked again per item, on the event loop and just before the rename: a build
            # may have been submitted with this context while the scan ran in its thread.
            if item.digest in self.in_use():
                continue
            doomed = self.store.detach(item)
            if doomed is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, doomed)
            deleted += 1
            deleted_bytes += item.size
            log.info("deleted unused context %s (%d bytes)", item.digest, item.size)
        if deleted:
            self.on_deleted(deleted, deleted_bytes)
        return CollectionReport(deleted, deleted_bytes, self.store.stored_bytes, swept)

    async def run(self, interval: float = DEFAULT_INTERVAL) -> None:
        """Collects at once, then every `interval` seconds, until cancelled."""
        while True:
            try:
                report = await self.collect()
                if report.deleted or report.temp_files_removed:
                    log.info(
                        "context GC: deleted %d contexts (%d bytes) and %d stale temp files; "
                        "%d bytes stored", report.deleted, report.deleted_bytes,
                        report.temp_files_removed, report.kept_bytes,
                    )  # fmt: skip
            except OSError:
                # A full or failing disk must not end the loop: the next pass may succeed.
                log.exception("context GC pass failed")
            await asyncio.sleep(interval)

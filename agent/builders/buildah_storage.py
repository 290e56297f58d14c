"""Where buildah keeps images for concurrent slots, and when finished jobs' images go."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

# Images of finished jobs that may wait for a quiet storage before new builds wait too.
MAX_DEFERRED_REMOVALS = 32
# Removal starts once this many images are queued: an `rmi` after every job made the next
# build of that platform wait for it, and untagging frees little (cached layers stay).
REMOVAL_BATCH = 8


def default_run_root(storage_root: Path) -> Path:
    """Where the volatile half of a storage lives, one per storage root: under /run for root
    (tmpfs, emptied by a reboot as containers-storage expects), else $XDG_RUNTIME_DIR or the
    temp dir."""
    if os.geteuid() == 0 and Path("/run").is_dir():
        base = Path("/run/polyarch-agent")
    else:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / "polyarch-agent"
    key = hashlib.sha256(str(storage_root.resolve()).encode()).hexdigest()[:16]
    return base / f"buildah-{key}"


class StorageUsers:
    """The builds using one containers-storage: they run together; removals wait for quiet.

    `buildah rmi` of a finished job's image deletes layers that a concurrent build in the
    same storage may be reusing from its cache at that moment (identical steps give
    identical images), which fails that build with "layer not known". So each finished
    job's image is only queued, and the queue is removed when no build uses the storage and
    REMOVAL_BATCH images wait.
    New builds wait while a removal runs (one `buildah rmi`, in the background: the build
    that left last does not wait for it), and, once
    MAX_DEFERRED_REMOVALS images are queued, until the storage goes quiet, so removal can
    never starve on a busy agent.
    """

    def __init__(
        self,
        remove: Callable[[list[str]], Awaitable[None]],
        max_deferred: int = MAX_DEFERRED_REMOVALS,
        batch: int = REMOVAL_BATCH,
    ) -> None:
        self._remove = remove
        self._max_deferred = max_deferred
        self._batch = min(batch, max_deferred)
        self._changed = asyncio.Condition()
        self._active = 0
        self._removing = False
        self._deferred: list[str] = []
        self._removals: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        return self._active

    @property
    def deferred(self) -> tuple[str, ...]:
        return tuple(self._deferred)

    def _may_start(self) -> bool:
        return not self._removing and len(self._deferred) < self._max_deferred

    @asynccontextmanager
    async def building(self) -> AsyncIterator[None]:
        """Holds the storage for one build; on leaving, removes queued images if it was last."""
        async with self._changed:
            await self._changed.wait_for(self._may_start)
            self._active += 1
        try:
            yield
        finally:
            async with self._changed:
                self._active -= 1
                batch: list[str] = []
                due = len(self._deferred) >= self._batch
                if self._active == 0 and due and not self._removing:
                    self._removing = True
                    batch, self._deferred = self._deferred, []
                self._changed.notify_all()
            if batch:
                # in the background: the leaving build reports its result now (a `buildah
                # rmi` takes a tenth of a second or more); new builds wait for it instead
                removal = asyncio.get_running_loop().create_task(self._remove_batch(batch))
                self._removals.add(removal)
                removal.add_done_callback(self._removals.discard)

    async def idle(self) -> None:
        """Returns once no removal runs (for shutdown and tests)."""
        while self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    def remove_later(self, image: str) -> None:
        """Queues a finished job's image for removal once no build uses the storage."""
        self._deferred.append(image)

    async def _remove_batch(self, batch: list[str]) -> None:
        # `remove` reports its own per-image failures; only a cancelled removal is retried.
        removed = False
        try:
            await self._remove(batch)
            removed = True
        finally:
            async with self._changed:
                if not removed:
                    self._deferred[:0] = batch
                self._removing = False
                self._changed.notify_all()

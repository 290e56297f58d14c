"""Durable build and job state: the StateStore contract, its errors, and the memory backend."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from polyarch.coordinator.core.model import (
    BuildRecord,
    JobRecord,
)
from polyarch.coordinator.core.presence import AgentPresence

log = logging.getLogger(__name__)

T = TypeVar("T")


class DuplicateIdempotencyKey(Exception):
    """create_build was given an idempotency key another build already holds."""

    def __init__(self, build_id: str) -> None:
        super().__init__(f"idempotency key already used by build {build_id}")
        self.build_id = build_id


class StoreError(Exception):
    """The backend failed (disk full, I/O error, a closed store): the write is not durable."""


class StoreClosed(StoreError):
    """The store was used after close()."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer polyarch: this one would misread it, so it stops."""

    def __init__(self, where: str, found: int, known: int) -> None:
        super().__init__(
            f"{where} has schema version {found}, newer than version {known} that this polyarch "
            "knows: upgrade polyarch (a downgrade cannot read it)"
        )
        self.found, self.known = found, known


class Fenced(StoreError):
    """This coordinator's term ended (another took over): it may write nothing more."""

    def __init__(self, mine: int) -> None:
        super().__init__(
            f"this coordinator's term {mine} has ended: another coordinator is active now, "
            "so this one writes nothing more"
        )
        self.epoch = mine


class StateStore(Protocol):
    """Where builds and jobs live.

    Writes are queued in call order and applied by one writer. Each write method snapshots the
    record at call time (later mutation of the object changes nothing) and returns an
    asyncio.Future that resolves once the write is durable; writes queued together share one
    commit. Callers may ignore the future (fire and forget): a failed write is logged, never an
    un-retrieved-exception warning. Cancelling the future does not cancel the write. Reads run
    after every write queued before them, and see them.

    A store is bound to the event loop of its first call; call it from that loop only.

    Contract (tests/unit/test_store_contract.py runs it against every backend):
    - create_build stores a build and its jobs atomically; for a build whose non-empty
      idempotency key another build holds, its future raises DuplicateIdempotencyKey naming
      the first, none of its rows are written, and other writes are unaffected.
    - save_build writes a stored build's state and outcome (state, finished_at, index digest,
      media type and size, error); its request (spec, owner, idempotency key, request hash,
      created_at) is written once, by create_build. save_job overwrites the stored job and
      appends a transition
      (job id, attempt, state, reason, time) when (state, attempt) changed; create_build
      records each job's first transition with the reason "submitted".
    - A write that fails for any other reason raises StoreError from its future.
    - Reads return copies: mutating them changes nothing until saved.
    - jobs_of lists a build's jobs in the order they were created; jobs_of_many does the same
      for many builds in one query, with a (possibly empty) list for every id asked for.
    - unfinished_builds is oldest first.
    - list_builds_page orders by (created_at, id), newest first, and returns up to `limit`
      builds strictly after the cursor `before` (a (created_at, id) pair; None: the newest),
      so pages never repeat or skip a build, even among builds created at the same time.
    - save_presence records an agent's arrival or departure (the latest per name wins);
      agents_present lists those last seen arriving, and those that left at or after
      `since`, by name.
    - flush resolves once every write queued before it is durable (or has failed).
    - close flushes, stops the writer and closes; it is idempotent. Later calls raise
      StoreClosed (writes: from their future).
    """

    def create_build(self, build: BuildRecord, jobs: list[JobRecord]) -> asyncio.Future[None]: ...
    def save_build(self, build: BuildRecord) -> asyncio.Future[None]: ...
    def save_job(
        self, job: JobRecord, reason: str = "", at: float = 0.0
    ) -> asyncio.Future[None]: ...
    async def get_build(self, build_id: str) -> BuildRecord | None: ...
    async def find_by_idempotency_key(self, key: str) -> BuildRecord | None: ...
    async def jobs_of(self, build_id: str) -> list[JobRecord]: ...
    async def jobs_of_many(self, build_ids: list[str]) -> dict[str, list[JobRecord]]: ...
    async def list_builds_page(
        self, limit: int, before: tuple[float, str] | None = None
    ) -> list[BuildRecord]: ...
    async def unfinished_builds(self) -> list[BuildRecord]: ...
    async def transitions(self, job_id: str) -> list[tuple[int, str, str]]: ...
    def save_presence(self, presence: AgentPresence) -> asyncio.Future[None]: ...
    async def agents_present(self, since: float) -> list[AgentPresence]: ...
    async def flush(self) -> None: ...
    async def close(self) -> None: ...


class _LoopAffinity:
    """Binds a store to the event loop of its first call and settles futures on it."""

    _loop: asyncio.AbstractEventLoop | None = None

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("this store is bound to another event loop")
        return loop


def _settle(future: asyncio.Future[Any], value: object, error: BaseException | None) -> None:
    """Resolves a store future; a failure counts as retrieved (the writer has logged it)."""
    if future.done():  # cancelled by its caller: the write happened all the same
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
        future.exception()  # marks it retrieved: fire-and-forget callers get no warning


def _log_failed_write(error: BaseException) -> None:
    if isinstance(error, DuplicateIdempotencyKey):
        log.debug("store: %s", error)
    else:
        log.error("store write failed: %s", error, exc_info=error)


class MemoryStore(_LoopAffinity):
    """StateStore in memory, for unit tests and scheduling simulations; nothing durable.

    Each write is applied at call time (on a deep copy) and returns a future already settled.
    """

    def __init__(self) -> None:
        self._builds: dict[str, BuildRecord] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._transitions: dict[str, list[tuple[int, str, str]]] = {}
        self._presence: dict[str, AgentPresence] = {}
        self._closed = False

    def create_build(self, build: BuildRecord, jobs: list[JobRecord]) -> asyncio.Future[None]:
        def apply() -> None:
            key = build.idempotency_key
            first = next(
                (b for b in self._builds.values() if key and b.idempotency_key == key), None
            )
            if first is not None:
                raise DuplicateIdempotencyKey(first.id)
            self._builds[build.id] = copy.deepcopy(build)
            for job in jobs:
                self._put_job(job, "submitted")

        return self._write(apply)

    def save_build(self, build: BuildRecord) -> asyncio.Future[None]:
        outcome = (build.state, build.finished_at, build.index_digest, build.index_media_type,
                   build.index_size, build.error)  # fmt: skip
        return self._write(lambda: self._put_outcome(build.id, outcome))

    def save_job(self, job: JobRecord, reason: str = "", at: float = 0.0) -> asyncio.Future[None]:
        return self._write(lambda: self._put_job(job, reason))

    def _put_outcome(self, build_id: str, outcome: tuple[Any, ...]) -> None:
        stored = self._builds.get(build_id)
        if stored is not None:
            (stored.state, stored.finished_at, stored.index_digest, stored.index_media_type,
             stored.index_size, stored.error) = outcome  # fmt: skip

    async def get_build(self, build_id: str) -> BuildRecord | None:
        self._check_open()
        return copy.deepcopy(self._builds.get(build_id))

    async def find_by_idempotency_key(self, key: str) -> BuildRecord | None:
        self._check_open()
        found = (b for b in self._builds.values() if key and b.idempotency_key == key)
        return copy.deepcopy(next(found, None))

    async def jobs_of(self, build_id: str) -> list[JobRecord]:
        return (await self.jobs_of_many([build_id]))[build_id]

    async def jobs_of_many(self, build_ids: list[str]) -> dict[str, list[JobRecord]]:
        self._check_open()
        found: dict[str, list[JobRecord]] = {build_id: [] for build_id in build_ids}
        for job in self._jobs.values():
            if job.build_id in found:
                found[job.build_id].append(copy.deepcopy(job))
        return found

    async def list_builds_page(
        self, limit: int, before: tuple[float, str] | None = None
    ) -> list[BuildRecord]:
        self._check_open()
        ordered = sorted(self._builds.values(), key=lambda b: (b.created_at, b.id), reverse=True)
        after = [b for b in ordered if before is None or (b.created_at, b.id) < before]
        return [copy.deepcopy(b) for b in after[:limit]]

    async def unfinished_builds(self) -> list[BuildRecord]:
        self._check_open()
        ordered = sorted(self._builds.values(), key=lambda b: b.created_at)  # stable: creation
        return [copy.deepcopy(b) for b in ordered if not b.state.terminal]

    async def transitions(self, job_id: str) -> list[tuple[int, str, str]]:
        self._check_open()
        return list(self._transitions.get(job_id, []))

    def save_presence(self, presence: AgentPresence) -> asyncio.Future[None]:
        return self._write(lambda: self._presence.__setitem__(presence.name, presence))

    async def agents_present(self, since: float) -> list[AgentPresence]:
        self._check_open()
        return [p for _, p in sorted(self._presence.items()) if p.present or p.at >= since]

    async def flush(self) -> None:
        self._check_open()

    async def close(self) -> None:
        self._closed = True

    def _put_job(self, job: JobRecord, reason: str) -> None:
        previous = self._jobs.get(job.id)
        if previous is None or (previous.state, previous.attempt) != (job.state, job.attempt):
            self._transitions.setdefault(job.id, []).append((job.attempt, job.state.value, reason))
        self._jobs[job.id] = copy.deepcopy(job)

    def _write(self, apply: Callable[[], object]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self._bind().create_future()
        error: BaseException | None = None
        try:
            if self._closed:
                raise StoreClosed("write after the store was closed")
            apply()
        except (DuplicateIdempotencyKey, StoreClosed) as failed:
            error = failed
            _log_failed_write(failed)
        _settle(future, None, error)
        return future

    def _check_open(self) -> None:
        self._bind()
        if self._closed:
            raise StoreClosed("read after the store was closed")

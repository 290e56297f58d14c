"""The unfinished builds in memory, mirrored to the store: checked, stored, counted, announced."""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from polyarch.coordinator.core.events import BuildChanged, BuildEvent, EventHub, JobChanged
from polyarch.coordinator.core.model import BuildRecord, BuildState, JobRecord, JobState, NotFound
from polyarch.coordinator.core.presence import AgentPresence
from polyarch.coordinator.core.states import check_build, check_job
from polyarch.coordinator.core.store import StateStore
from polyarch.coordinator.metrics import CoordinatorMetrics


class BuildLedger:
    """Holds each unfinished build with its jobs. Every state change goes through move_job or
    move_build: the state machine (states.py) checks it, the store queues it (group commit),
    metrics count it, and watchers hear of it only once the write is durable."""

    def __init__(
        self,
        store: StateStore,
        hub: EventHub,
        metrics: CoordinatorMetrics,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.hub = hub
        self.metrics = metrics
        self.clock = clock
        self._active: dict[str, tuple[BuildRecord, dict[str, JobRecord]]] = {}
        self._build_of_job: dict[str, str] = {}
        # the newest write: writes commit in order, so once it is durable all earlier ones are
        self._last_write: asyncio.Future[None] | None = None
        self._transition_counters: dict[JobState, Any] = {}
        # unfinished builds by state, kept as they change: the fleet gauges read it each tick
        self.unfinished_by_state: Counter[BuildState] = Counter()
        # called with the build id once a build has ended (e.g. to forget its credentials)
        self.on_finished: list[Callable[[str], None]] = []

    def track(self, build: BuildRecord, jobs: list[JobRecord]) -> None:
        """Adds an unfinished build (just submitted, or reloaded after a restart)."""
        self._active[build.id] = (build, {job.id: job for job in jobs})
        self.unfinished_by_state[build.state] += 1
        for job in jobs:
            self._build_of_job[job.id] = build.id

    def is_active(self, build_id: str) -> bool:
        return build_id in self._active

    def active(self) -> Iterator[tuple[BuildRecord, list[JobRecord]]]:
        for build, jobs in list(self._active.values()):
            yield build, list(jobs.values())

    def live(self, build_id: str) -> tuple[BuildRecord, list[JobRecord]] | None:
        """An unfinished build and its jobs (the live records), or None once it has ended."""
        found = self._active.get(build_id)
        return None if found is None else (found[0], list(found[1].values()))

    async def get(self, build_id: str) -> tuple[BuildRecord, list[JobRecord]]:
        """A build and its jobs: the live records while it runs, the stored ones after."""
        found = self.live(build_id)
        if found is not None:
            return found
        stored = await self.store.get_build(build_id)
        if stored is None:
            raise NotFound(f"no build with id {build_id!r}")
        return stored, await self.store.jobs_of(build_id)

    def find_job(self, job_id: str) -> tuple[BuildRecord, JobRecord] | None:
        """The live job with this id and its build, or None once the build has ended."""
        build_id = self._build_of_job.get(job_id)
        if build_id is None:
            return None
        build, jobs = self._active[build_id]
        return build, jobs[job_id]

    # ---- the one way each kind of record changes ---------------------------------------
    def move_job(self, build: BuildRecord, job: JobRecord, state: JobState, reason: str) -> None:
        """Changes a job's state (IllegalTransition if the machine does not allow it)."""
        check_job(job.id, job.state, state)
        job.state = state
        self._write(self.store.save_job(job, reason, self.clock()))
        self._transitions_to(state).inc()
        if self.hub.watched(build.id):
            self._announce(build.id, JobChanged(_copy_job(job)))

    def save_job(self, job: JobRecord, reason: str) -> None:
        """Persists a job's details without a state change (e.g. verified size and type)."""
        self._write(self.store.save_job(job, reason, self.clock()))

    def record_presence(self, presence: AgentPresence) -> None:
        """Persists an agent's arrival or departure (presence.py)."""
        self._write(self.store.save_presence(presence))

    def move_build(self, build: BuildRecord, state: BuildState) -> None:
        """Changes a build's state (IllegalTransition if the machine does not allow it)."""
        check_build(build.id, build.state, state)
        self.unfinished_by_state[build.state] -= 1
        if not state.terminal:
            self.unfinished_by_state[state] += 1
        build.state = state
        self._write(self.store.save_build(build))
        if self.hub.watched(build.id):
            _, jobs = self._active[build.id]
            snapshot = tuple(_copy_job(j) for j in jobs.values())
            self._announce(build.id, BuildChanged(copy.copy(build), snapshot))

    def finish(self, build: BuildRecord, state: BuildState, error: str) -> None:
        """Ends a build: stored, counted, announced, its watchers closed, then forgotten."""
        build.error = error
        build.finished_at = self.clock()
        self.move_build(build, state)
        self.metrics.builds_finished.labels(result=state.value).inc()
        _, jobs = self._active[build.id]
        for job_id in jobs:
            self._build_of_job.pop(job_id, None)
        # until the end is durable, reads of this build are answered from memory
        done = self._last_write
        assert done is not None
        done.add_done_callback(lambda _: self._forget(build.id))

    async def durable(self) -> None:
        """Returns once every change made so far is durable."""
        if self._last_write is not None:
            await asyncio.shield(self._last_write)

    # ---- internals ----------------------------------------------------------------------
    def _transitions_to(self, state: JobState) -> Any:
        """The counter child of one state, looked up once (every change increments one)."""
        child = self._transition_counters.get(state)
        if child is None:
            child = self._transition_counters[state] = self.metrics.job_transitions.labels(
                state=state.value
            )
        return child

    def _write(self, write: asyncio.Future[None]) -> None:
        self._last_write = write

    def _announce(self, build_id: str, event: BuildEvent) -> None:
        """Watchers hear of a change once it is durable (callbacks run in commit order)."""
        assert self._last_write is not None
        self._last_write.add_done_callback(lambda _: self.hub.publish(build_id, event))

    def _forget(self, build_id: str) -> None:
        self.hub.finish(build_id)
        found = self._active.pop(build_id, None)
        for job_id in found[1] if found else ():
            self.hub.forget_job(job_id)
        for hook in self.on_finished:
            hook(build_id)


def _copy_job(job: JobRecord) -> JobRecord:
    """A copy watchers can keep: later changes to the live record do not reach it."""
    snapshot = copy.copy(job)
    snapshot.requeue_reasons = list(job.requeue_reasons)
    return snapshot

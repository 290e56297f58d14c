"""The unfinished builds in memory, mirrored to the store: stored, counted, then announced."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from polyarch.coordinator.core.events import EventHub
from polyarch.coordinator.core.model import BuildRecord, BuildState, JobRecord, JobState, NotFound
from polyarch.coordinator.core.store import StateStore
from polyarch.coordinator.metrics import CoordinatorMetrics
from polyarch.coordinator.wire import convert
from polyarch.proto.v1 import build_pb2


class BuildLedger:
    """Holds each unfinished build with its jobs; every change goes through here, so it is
    persisted before any watcher or metric sees it, in that order."""

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
        # called with the build id once a build has ended (e.g. to forget its credentials)
        self.on_finished: list[Callable[[str], None]] = []

    def track(self, build: BuildRecord, jobs: list[JobRecord]) -> None:
        """Adds an unfinished build (just submitted, or reloaded after a restart)."""
        self._active[build.id] = (build, {job.id: job for job in jobs})
        for job in jobs:
            self._build_of_job[job.id] = build.id

    def is_active(self, build_id: str) -> bool:
        return build_id in self._active

    def active(self) -> Iterator[tuple[BuildRecord, list[JobRecord]]]:
        for build, jobs in list(self._active.values()):
            yield build, list(jobs.values())

    def get(self, build_id: str) -> tuple[BuildRecord, list[JobRecord]]:
        """A build and its jobs: the live records while it runs, the stored ones after."""
        if build_id in self._active:
            build, jobs = self._active[build_id]
            return build, list(jobs.values())
        stored = self.store.get_build(build_id)
        if stored is None:
            raise NotFound(f"no build with id {build_id!r}")
        return stored, self.store.jobs_of(build_id)

    def find_job(self, job_id: str) -> tuple[BuildRecord, JobRecord] | None:
        """The live job with this id and its build, or None once the build has ended."""
        build_id = self._build_of_job.get(job_id)
        if build_id is None:
            return None
        build, jobs = self._active[build_id]
        return build, jobs[job_id]

    def set_job(self, build: BuildRecord, job: JobRecord, state: JobState, reason: str) -> None:
        job.state = state
        self.store.save_job(job, reason, self.clock())
        self.metrics.job_transitions.labels(state=state.value).inc()
        self.hub.publish(build.id, build_pb2.BuildEvent(job=convert.job_message(job)))

    def save_job(self, job: JobRecord, reason: str) -> None:
        """Persists a job's details without a state change (e.g. verified size and type)."""
        self.store.save_job(job, reason, self.clock())

    def set_build(self, build: BuildRecord, state: BuildState) -> None:
        build.state = state
        self.store.save_build(build)
        _, jobs = self._active[build.id]
        self.hub.publish(
            build.id, build_pb2.BuildEvent(build=convert.build_message(build, list(jobs.values())))
        )

    def finish(self, build: BuildRecord, state: BuildState, error: str) -> None:
        """Ends a build: stored, counted, announced to watchers, then dropped from memory."""
        build.error = error
        build.finished_at = self.clock()
        self.set_build(build, state)
        self.metrics.builds_finished.labels(result=state.value).inc()
        self.hub.finish(build.id)
        _, jobs = self._active.pop(build.id)
        for job_id in jobs:
            self._build_of_job.pop(job_id, None)
            self.hub.forget_job(job_id)
        for hook in self.on_finished:
            hook(build.id)

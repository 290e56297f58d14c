"""Dispatch: a task woken by events that applies the scheduler's placements and sends them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from polyarch.coordinator.core.fleet import AgentSession, Assign
from polyarch.coordinator.core.ledger import BuildLedger
from polyarch.coordinator.core.model import BuildState, JobState, Mode, push_tag
from polyarch.coordinator.core.scheduler import Placement, Scheduler
from polyarch.coordinator.metrics import CoordinatorMetrics
from polyarch.coordinator.registry.build_credentials import BuildCredentials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Pending:
    session: AgentSession
    job_id: str
    attempt: int


class Dispatcher:
    """Runs as its own task: every event that may free a slot or queue a job wakes it (wake()
    only sets a flag, so a burst of events costs one pass). A pass applies what the scheduler
    placed, waits until those assignments are durable (one group commit for the whole pass),
    then sends them, skipping any that a cancel or a lost agent overtook meanwhile."""

    def __init__(
        self,
        scheduler: Scheduler,
        ledger: BuildLedger,
        sessions: dict[str, AgentSession],
        metrics: CoordinatorMetrics,
        credentials_of: Callable[[str], BuildCredentials | None],
        clock: Callable[[], float],
    ) -> None:
        self.scheduler = scheduler
        self.ledger = ledger
        self.sessions = sessions
        self.metrics = metrics
        self.credentials_of = credentials_of
        self.clock = clock
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dispatch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    async def settle(self) -> None:
        """Returns once no pass is pending or running and every change is durable (tests and
        shutdown use it rather than sleeping)."""
        while True:
            await self.ledger.durable()
            await asyncio.sleep(0)  # lets the callbacks of that commit run
            busy = self._wake.is_set() or not self._idle.is_set()
            if self._task is None or not busy:
                return
            await asyncio.sleep(0.001)

    async def _run(self) -> None:
        while True:
            self._idle.set()
            await self._wake.wait()
            self._idle.clear()
            self._wake.clear()
            try:
                await self._pass()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one pass must not stop dispatching for good
                log.exception("dispatch pass failed")

    async def _pass(self) -> None:
        pending = [p for p in map(self._apply, self.scheduler.schedule()) if p is not None]
        if not pending:
            return
        await self.ledger.durable()
        for item in pending:
            command = self._assignment(item)
            if command is not None:
                item.session.send(command)

    def _apply(self, placement: Placement) -> _Pending | None:
        """Records one placement as the job's next attempt (ASSIGNED, queued for commit)."""
        job_id, agent, mode = placement.job_id, placement.agent, placement.mode
        found = self.ledger.find_job(job_id)
        session = self.sessions.get(agent)
        if found is None or session is None:
            self.scheduler.release(job_id)
            return None
        build, job = found
        now = self.clock()
        self.metrics.queue_wait.labels(platform=job.platform).observe(now - job.queued_at)
        job.attempt += 1
        job.agent, job.mode = agent, mode
        job.started_at = job.finished_at = None
        job.error = job.failed_step = ""
        self.ledger.move_job(build, job, JobState.ASSIGNED, f"assigned to {agent} ({mode.value})")
        if build.state is BuildState.QUEUED:
            self.ledger.move_build(build, BuildState.RUNNING)
        return _Pending(session, job.id, job.attempt)

    def _assignment(self, item: _Pending) -> Assign | None:
        """The command to send, or None when the attempt is no longer current."""
        found = self.ledger.find_job(item.job_id)
        if found is None or item.session.closed:
            return None
        build, job = found
        current = job.state is JobState.ASSIGNED and job.attempt == item.attempt
        if not current or job.agent != item.session.name:
            return None
        return Assign(
            build_id=build.id, job_id=job.id, attempt=job.attempt, platform=job.platform,
            emulated=job.mode is Mode.EMULATED, spec=build.spec,
            push_tag=push_tag(build.id, job.platform, job.attempt),
            credentials=self.credentials_of(build.id) or BuildCredentials(),
        )  # fmt: skip

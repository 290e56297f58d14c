"""The end of a build: fail it when a platform failed, else assemble and publish its index."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from polyarch.coordinator.core.ledger import BuildLedger
from polyarch.coordinator.core.model import BuildRecord, BuildSpec, BuildState, JobRecord, JobState
from polyarch.coordinator.metrics import CoordinatorMetrics
from polyarch.coordinator.registry.build_credentials import BuildCredentials
from polyarch.coordinator.registry.index import IndexResult

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Verifies a build's images and pushes its index (assembly.IndexPublisher in production),
    with the build's own registry credentials over the farm's when it brought some."""

    async def publish(
        self, spec: BuildSpec, jobs: list[JobRecord], own: BuildCredentials | None = None
    ) -> IndexResult: ...


def failure_summary(failed: list[JobRecord]) -> str:
    """One line naming each failed platform, its step and its agent."""
    return "; ".join(
        f"{j.platform} failed"
        + (f" at step {j.failed_step!r}" if j.failed_step else "")
        + (f" on agent {j.agent}" if j.agent else "")
        + f": {j.error}"
        for j in failed
    )


class Completion:
    """Watches for builds whose jobs have all ended and finishes them exactly once."""

    def __init__(
        self,
        ledger: BuildLedger,
        publisher: Publisher,
        metrics: CoordinatorMetrics,
        credentials_of: Callable[[str], BuildCredentials | None] = lambda _build_id: None,
    ) -> None:
        self.ledger = ledger
        self.publisher = publisher
        self.metrics = metrics
        self.credentials_of = credentials_of
        self._assemblies: dict[str, asyncio.Task[None]] = {}

    def check(self, build: BuildRecord) -> None:
        """Finishes the build if every job has ended: failed, or published (in the background)."""
        live = self.ledger.live(build.id)
        if live is None or build.state.terminal or not all(j.state.terminal for j in live[1]):
            return
        jobs = live[1]
        failed = [j for j in jobs if j.state is JobState.FAILED]
        if failed:
            summary = failure_summary(failed)
            self.ledger.finish(build, BuildState.FAILED, summary + " (no tag was published)")
            return
        if build.state is not BuildState.ASSEMBLING:
            self.ledger.move_build(build, BuildState.ASSEMBLING)
        if build.id not in self._assemblies:
            self._assemblies[build.id] = asyncio.get_running_loop().create_task(
                self._assemble(build), name=f"assemble-{build.id}"
            )

    def cancel(self, build_id: str) -> None:
        task = self._assemblies.pop(build_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        for task in list(self._assemblies.values()):
            task.cancel()
        await asyncio.gather(*self._assemblies.values(), return_exceptions=True)

    async def _assemble(self, build: BuildRecord) -> None:
        _, jobs = await self.ledger.get(build.id)
        started = time.monotonic()
        try:
            result = await self.publisher.publish(build.spec, jobs, self.credentials_of(build.id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure ends the build with its reason
            log.warning("build %s: index assembly failed: %s", build.id, exc)
            for job in jobs:
                if job.failed_step == "scan":  # the scanner's status and tail, kept
                    self.ledger.save_job(job, "refused by the scan gate")
            self.ledger.finish(build, BuildState.FAILED, f"index assembly failed: {exc}")
            return
        finally:
            self._assemblies.pop(build.id, None)
            self.metrics.assembly_duration.observe(time.monotonic() - started)
        build.index_digest, build.index_media_type = result.digest, result.media_type
        build.index_size = result.size
        for job in jobs:
            self.ledger.save_job(job, "verified in the registry")
        self.ledger.finish(build, BuildState.SUCCEEDED, "")

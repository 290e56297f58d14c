"""The coordinator's own bound on one attempt: when each attempt began, and which are overdue."""

from __future__ import annotations

from collections.abc import Iterable

from polyarch.coordinator.core.model import BuildRecord, JobRecord, JobState

ON_AGENT = (JobState.ASSIGNED, JobState.RUNNING)


def timeout_reason(seconds: float) -> str:
    return f"no result after {seconds:g} s (coordinator job timeout)"


class AttemptClock:
    """Remembers when each attempt (job id, attempt) was first seen on an agent.

    The watchdog looks every second, so an attempt's start is known to within that; an
    agent's own report (started_at) is used when it is earlier. Attempts adopted after a
    coordinator restart start counting when first seen, never earlier: a timeout is never
    cut short by time the coordinator did not watch."""

    def __init__(self) -> None:
        self._began: dict[tuple[str, int], float] = {}

    def overdue(
        self, live: Iterable[tuple[BuildRecord, JobRecord]], now: float, limit: float
    ) -> list[tuple[BuildRecord, JobRecord]]:
        """The attempts on agents that began more than `limit` seconds before `now`."""
        seen: dict[tuple[str, int], float] = {}
        late = []
        for build, job in live:
            if job.state not in ON_AGENT:
                continue
            key = (job.id, job.attempt)
            began = self._began.get(key, now)
            if job.started_at is not None and job.started_at < began:
                began = job.started_at
            seen[key] = began
            if now - began > limit:
                late.append((build, job))
        self._began = seen  # attempts that ended or moved on are forgotten
        return late

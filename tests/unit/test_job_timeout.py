"""The coordinator's job timeout, with simulated agents and a controlled clock."""

from __future__ import annotations

from pathlib import Path

from polyarch.coordinator.core.fleet import AgentSession, Assign, Cancel
from polyarch.coordinator.core.manager import BuildManager
from polyarch.coordinator.core.model import BuildSpec, BuildState, JobState
from polyarch.coordinator.core.states import MAX_ATTEMPTS, JobOutcome
from polyarch.coordinator.limits import Limits
from tests.support.simulated import DIGEST, Clock, connect, received, started_manager

TIMEOUT = 60.0
REASON = "no result after 60 s (coordinator job timeout)"


async def setup(tmp_path: Path) -> tuple[BuildManager, Clock]:
    clock = Clock(5000.0)
    manager = await started_manager(
        tmp_path, clock=clock, limits=Limits(job_timeout_seconds=TIMEOUT)
    )
    return manager, clock


def agent(manager: BuildManager, name: str) -> AgentSession:
    return connect(manager, name, ["linux/amd64"], slots=1)


async def submit(manager: BuildManager) -> str:
    spec = BuildSpec(DIGEST, "Dockerfile", ["linux/amd64"], ["127.0.0.1:5000/a/b:1"])
    return (await manager.submit(spec, ""))[0].id


async def test_an_attempt_without_a_result_is_cancelled_on_its_agent_and_requeued(
    tmp_path: Path,
) -> None:
    manager, clock = await setup(tmp_path)
    silent = agent(manager, "silent")
    build_id = await submit(manager)
    (assign,) = await received(manager, silent, Assign)
    manager.job_started("silent", assign.job_id, 1)
    manager.expire_overdue_jobs()
    clock.now += TIMEOUT  # exactly the timeout: not yet over it
    manager.expire_overdue_jobs()
    assert await received(manager, silent, Cancel) == []
    other = agent(manager, "other")  # heartbeats alone never extend an attempt
    manager.roster.heartbeat(silent)
    clock.now += 1
    manager.expire_overdue_jobs()
    (cancel,) = await received(manager, silent, Cancel)
    assert (cancel.job_id, cancel.attempt, cancel.reason) == (assign.job_id, 1, REASON)
    (retry,) = await received(manager, other, Assign)  # re-queued, away from the silent agent
    assert (retry.job_id, retry.attempt) == (assign.job_id, 2)
    _, (job,) = await manager.get(build_id)
    assert job.requeue_reasons == [f"{REASON} on silent"]
    assert manager.metrics.registry.get_sample_value(
        "polyarch_job_requeues_total", {"reason": "infrastructure"}) == 1  # fmt: skip
    # the timed-out attempt's result comes late: fenced off, the new attempt carries on
    manager.job_result("silent", assign.job_id, 1, JobOutcome(ok=False, error="late"))
    _, (job,) = await manager.get(build_id)
    assert (job.state, job.attempt) == (JobState.ASSIGNED, 2)
    await manager.close()


async def test_an_attempt_that_reports_in_time_is_left_alone(tmp_path: Path) -> None:
    manager, clock = await setup(tmp_path)
    prompt = agent(manager, "prompt")
    await submit(manager)
    (assign,) = await received(manager, prompt, Assign)
    manager.expire_overdue_jobs()
    clock.now += TIMEOUT / 2
    manager.job_log("prompt", assign.job_id, 1, ["still building"])
    manager.expire_overdue_jobs()
    manager.job_result("prompt", assign.job_id, 1, JobOutcome(ok=False, error="compile error"))
    clock.now += 10 * TIMEOUT
    manager.expire_overdue_jobs()
    assert await received(manager, prompt, Cancel) == []
    await manager.close()


async def test_timeouts_count_against_max_attempts_and_then_fail_the_build(
    tmp_path: Path,
) -> None:
    manager, clock = await setup(tmp_path)
    slow = agent(manager, "slow")
    build_id = await submit(manager)
    cancelled = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert [a.attempt for a in await received(manager, slow, Assign)] == [attempt]
        manager.expire_overdue_jobs()
        clock.now += TIMEOUT + 1
        manager.expire_overdue_jobs()
        cancelled += [c.attempt for c in await received(manager, slow, Cancel)]
    assert cancelled == list(range(1, MAX_ATTEMPTS + 1))  # each attempt cancelled once
    build, (job,) = await manager.get(build_id)
    assert job.state is JobState.FAILED
    assert job.error == f"gave up after {MAX_ATTEMPTS} attempts; last: {REASON} on slow"
    assert build.state is BuildState.FAILED
    await manager.close()

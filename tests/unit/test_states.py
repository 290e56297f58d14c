"""The state machines: every allowed and every forbidden transition, and the retry policy."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from polyarch.coordinator.core.events import EventHub
from polyarch.coordinator.core.ledger import BuildLedger
from polyarch.coordinator.core.model import BuildRecord, BuildSpec, BuildState, JobRecord, JobState
from polyarch.coordinator.core.states import (
    BUILD_TRANSITIONS,
    JOB_TRANSITIONS,
    MAX_ATTEMPTS,
    IllegalTransition,
    JobOutcome,
    Verdict,
    after_lost_attempt,
    describe_machines,
    judge,
)
from polyarch.coordinator.core.store import MemoryStore
from polyarch.coordinator.metrics import CoordinatorMetrics

README = Path(__file__).resolve().parents[2] / "README.md"
GOOD = JobOutcome(
    ok=True, digest="sha256:" + "a" * 64, size=9,
    media_type="application/vnd.oci.image.manifest.v1+json",
)  # fmt: skip


async def ledger_with(build_state: BuildState, job_state: JobState) -> tuple[
    BuildLedger, BuildRecord, JobRecord, MemoryStore
]:  # fmt: skip
    store = MemoryStore()
    ledger = BuildLedger(store, EventHub(), CoordinatorMetrics(), lambda: 1.0)
    build = BuildRecord("b1", BuildSpec("sha256:" + "0" * 64, "Dockerfile", ["linux/amd64"], []))
    job = JobRecord("b1-amd64", "b1", "linux/amd64")
    await store.create_build(build, [job])
    build.state, job.state = build_state, job_state
    ledger.track(build, [job])
    return ledger, build, job, store


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product(JobState, JobState)))
async def test_every_job_transition_is_allowed_or_refused_as_the_table_says(
    current: JobState, wanted: JobState
) -> None:
    ledger, build, job, store = await ledger_with(BuildState.RUNNING, current)
    if (current, wanted) in JOB_TRANSITIONS:
        ledger.move_job(build, job, wanted, "test")
        await ledger.durable()
        assert job.state is wanted
        assert (await store.jobs_of("b1"))[0].state is wanted
    else:
        with pytest.raises(IllegalTransition, match=f"{current.value} -> {wanted.value}"):
            ledger.move_job(build, job, wanted, "test")
        assert job.state is current  # refused before anything changed or was stored
        assert (await store.jobs_of("b1"))[0].state is JobState.QUEUED


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product(BuildState, BuildState)))
async def test_every_build_transition_is_allowed_or_refused_as_the_table_says(
    current: BuildState, wanted: BuildState
) -> None:
    ledger, build, _, store = await ledger_with(current, JobState.PUSHED)
    if (current, wanted) in BUILD_TRANSITIONS:
        ledger.move_build(build, wanted)
        await ledger.durable()
        stored = await store.get_build("b1")
        assert stored is not None and stored.state is wanted
    else:
        with pytest.raises(IllegalTransition, match=f"{current.value} -> {wanted.value}"):
            ledger.move_build(build, wanted)
        assert build.state is current


def test_terminal_states_have_no_way_out() -> None:
    for current, _ in JOB_TRANSITIONS:
        assert not current.terminal
    for build_state, _ in BUILD_TRANSITIONS:
        assert not build_state.terminal


def test_the_readme_shows_the_real_machines() -> None:
    text = README.read_text()
    for line in describe_machines().splitlines():
        if "->" in line:
            assert line.strip() in text, f"README.md lacks the transition {line.strip()!r}"


def job_at(attempt: int) -> JobRecord:
    return JobRecord("j", "b", "linux/amd64", attempt=attempt)


def test_a_lost_attempt_goes_back_to_the_queue_until_the_last_one() -> None:
    assert [after_lost_attempt(job_at(a)) for a in range(1, MAX_ATTEMPTS + 1)] == [
        *[JobState.QUEUED] * (MAX_ATTEMPTS - 1),
        JobState.FAILED,
    ]


@pytest.mark.parametrize(
    ("outcome", "attempt", "verdict", "says"),
    [
        (GOOD, 1, Verdict.PUSHED, ""),
        (GOOD, MAX_ATTEMPTS, Verdict.PUSHED, ""),
        (JobOutcome(ok=False, error="exit 2", failed_step="RUN make"), 1, Verdict.FAILED, "exit 2"),
        (JobOutcome(ok=False, error="disk full", failed_step="push", infrastructure_error=True),
         1, Verdict.RETRY, "push on a: disk full"),
        (JobOutcome(ok=False, error="disk full", infrastructure_error=True), MAX_ATTEMPTS,
         Verdict.FAILED, "disk full"),
        (JobOutcome(ok=True, digest="sha256:zz", size=9, media_type=GOOD.media_type), 1,
         Verdict.RETRY, "agent a reported a malformed digest"),
        (JobOutcome(ok=True, digest=GOOD.digest, size=-1, media_type=GOOD.media_type),
         MAX_ATTEMPTS, Verdict.FAILED, "a manifest size of -1"),
        (JobOutcome(ok=True, digest=GOOD.digest, size=0, media_type=GOOD.media_type), 1,
         Verdict.PUSHED, ""),
    ],
)  # fmt: skip
def test_the_verdict_on_each_kind_of_outcome(
    outcome: JobOutcome, attempt: int, verdict: Verdict, says: str
) -> None:
    got, reason, _ = judge(outcome, attempt, "a")
    assert got is verdict
    assert says in reason

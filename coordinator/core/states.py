"""The job and build state machines: every allowed transition, and the retry policy."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from polyarch.coordinator.core.model import BuildState, JobRecord, JobState
from polyarch.proto.media_types import IMAGE_MANIFEST_TYPES

# A job is tried this many times in all (agent lost, timed out, infrastructure error, a
# malformed result) before it fails. The only place this number is checked.
MAX_ATTEMPTS = 3

# Every (from, to) change a job may make, with when it happens. Anything else is a bug and
# the ledger refuses it (IllegalTransition). Terminal states have no way out.
JOB_TRANSITIONS: dict[tuple[JobState, JobState], str] = {
    (JobState.QUEUED, JobState.ASSIGNED): "the scheduler placed it on an agent",
    (JobState.QUEUED, JobState.RUNNING): (
        "re-attach: after a restart its last agent reconnects and still runs that attempt"
    ),
    (JobState.QUEUED, JobState.FAILED): "its build's secrets were lost in a restart",
    (JobState.QUEUED, JobState.CANCELLED): "its build was cancelled",
    (JobState.ASSIGNED, JobState.RUNNING): "the agent reported that it started",
    (JobState.ASSIGNED, JobState.PUSHED): "the agent reported a push before a start",
    (JobState.ASSIGNED, JobState.QUEUED): "re-queue: agent lost, timed out or retryable error",
    (JobState.ASSIGNED, JobState.FAILED): "a build error, or out of attempts",
    (JobState.ASSIGNED, JobState.CANCELLED): "its build was cancelled",
    (JobState.RUNNING, JobState.PUSHED): "the agent pushed the image and reported its digest",
    (JobState.RUNNING, JobState.QUEUED): "re-queue: agent lost, timed out or retryable error",
    (JobState.RUNNING, JobState.FAILED): "a build error, or out of attempts",
    (JobState.RUNNING, JobState.CANCELLED): "its build was cancelled",
}

BUILD_TRANSITIONS: dict[tuple[BuildState, BuildState], str] = {
    (BuildState.QUEUED, BuildState.RUNNING): "its first job was assigned",
    (BuildState.QUEUED, BuildState.FAILED): "a job failed before any ran (e.g. lost secrets)",
    (BuildState.QUEUED, BuildState.CANCELLED): "cancelled",
    (BuildState.RUNNING, BuildState.ASSEMBLING): "every job pushed: verify and push the index",
    (BuildState.RUNNING, BuildState.FAILED): "every job ended and one failed",
    (BuildState.RUNNING, BuildState.CANCELLED): "cancelled",
    (BuildState.ASSEMBLING, BuildState.SUCCEEDED): "the index is pushed under every tag",
    (BuildState.ASSEMBLING, BuildState.FAILED): "verification or the index push failed",
    (BuildState.ASSEMBLING, BuildState.CANCELLED): "cancelled",
}


class IllegalTransition(RuntimeError):
    """A change the state machine does not allow: a coordinator bug, never user input."""


def check_job(job_id: str, current: JobState, wanted: JobState) -> None:
    if (current, wanted) not in JOB_TRANSITIONS:
        raise IllegalTransition(f"job {job_id}: {current.value} -> {wanted.value} is not allowed")


def check_build(build_id: str, current: BuildState, wanted: BuildState) -> None:
    if (current, wanted) not in BUILD_TRANSITIONS:
        raise IllegalTransition(
            f"build {build_id}: {current.value} -> {wanted.value} is not allowed"
        )


# ---- the retry policy -------------------------------------------------------------------


class RetryKind(enum.StrEnum):
    """Why an attempt ended without a result of its own (the label of polyarch_job_requeues)."""

    AGENT_LOST = "agent_lost"
    INFRASTRUCTURE = "infrastructure"
    RESTART = "restart"


def after_lost_attempt(job: JobRecord) -> JobState:
    """Where a job goes when its attempt ended without a verdict: back to the queue while it
    has attempts left, else failed."""
    return JobState.QUEUED if job.attempt < MAX_ATTEMPTS else JobState.FAILED


def gave_up(job: JobRecord, reason: str) -> str:
    return f"gave up after {job.attempt} attempts; last: {reason}"


@dataclass(frozen=True)
class JobOutcome:
    """What an agent reported at the end of an attempt (the domain side of JobResult)."""

    ok: bool
    digest: str = ""
    size: int = 0
    media_type: str = ""
    error: str = ""
    failed_step: str = ""
    # the failure is the farm's (disk, network, registry), not the Dockerfile's: worth a retry
    infrastructure_error: bool = False


class Verdict(enum.StrEnum):
    PUSHED = "pushed"
    FAILED = "failed"
    RETRY = "retried"


_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def describe_malformed(outcome: JobOutcome) -> str:
    """Why a successful outcome cannot be taken as it is ("" when it can)."""
    if not _DIGEST.match(outcome.digest):
        return f"a malformed digest {outcome.digest[:80]!r} (want sha256:<64 hex>)"
    if outcome.size < 0:  # 0: unknown to the builder; assembly reads it from the registry
        return f"a manifest size of {outcome.size}"
    if outcome.media_type not in IMAGE_MANIFEST_TYPES:
        return f"an unknown manifest media type {outcome.media_type[:80]!r}"
    return ""


def judge(outcome: JobOutcome, attempt: int, agent: str) -> tuple[Verdict, str, str]:
    """The verdict on an attempt's outcome: (verdict, reason or error, failed step).

    A clean push is pushed. A malformed report or an infrastructure error is retried on
    another agent while attempts remain. A build error (the Dockerfile's) fails at once:
    running it again would fail again."""
    malformed = describe_malformed(outcome) if outcome.ok else ""
    if outcome.ok and not malformed:
        return Verdict.PUSHED, "", ""
    if malformed:
        reason = f"agent {agent} reported {malformed}"
        return (Verdict.RETRY if attempt < MAX_ATTEMPTS else Verdict.FAILED), reason, "push"
    if outcome.infrastructure_error and attempt < MAX_ATTEMPTS:
        step = outcome.failed_step or "build"
        return Verdict.RETRY, f"{step} on {agent}: {outcome.error}", outcome.failed_step
    return Verdict.FAILED, outcome.error, outcome.failed_step


def describe_machines() -> str:
    """Both machines as text (the README's table is checked against this)."""
    lines = ["job:"]
    lines += [f"  {a.value} -> {b.value}: {why}" for (a, b), why in JOB_TRANSITIONS.items()]
    lines.append("build:")
    lines += [f"  {a.value} -> {b.value}: {why}" for (a, b), why in BUILD_TRANSITIONS.items()]
    return "\n".join(lines)

"""The build manager's rules with simulated agents: requeue, fencing, idempotency, failure."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from polyarch.coordinator.contexts.store import ContextStore
from polyarch.coordinator.core.fleet import AgentSession
from polyarch.coordinator.core.manager import MAX_ATTEMPTS, AgentEvent, BuildManager
from polyarch.coordinator.core.model import (
    AlreadyExists,
    BuildSpec,
    BuildState,
    EmulationPolicy,
    InvalidRequest,
    JobRecord,
    JobState,
    NotFound,
    PermissionDenied,
    Unschedulable,
)
from polyarch.coordinator.core.store import MemoryStore
from polyarch.coordinator.metrics import CoordinatorMetrics
from polyarch.coordinator.registry.build_credentials import (
    BuildCredentials,
    check_build_credentials,
)
from polyarch.coordinator.registry.index import ChildManifest, IndexResult
from polyarch.proto.platforms import parse_platform
from polyarch.proto.v1 import agent_pb2
from tests.support.poll import poll_until

CONTEXT = b"not really a tar, the manager never opens it"
DIGEST = "sha256:" + hashlib.sha256(CONTEXT).hexdigest()


class RecordingPublisher:
    """Stands in for the registry: records what would be published."""

    def __init__(self) -> None:
        self.published: list[tuple[list[str], dict[str, str]]] = []
        self.credentials: list[BuildCredentials | None] = []

    async def publish(
        self, spec: BuildSpec, jobs: list[JobRecord], own: BuildCredentials | None = None
    ) -> IndexResult:
        children = {j.platform: j.digest for j in jobs}
        self.published.append((list(spec.tags), children))
        self.credentials.append(own)
        return IndexResult(
            digest="sha256:" + "f" * 64,
            media_type="application/vnd.oci.image.index.v1+json",
            size=123,
            children=tuple(
                ChildManifest(parse_platform(p), d, "application/vnd.oci.image.manifest.v1+json", 9)
                for p, d in children.items()
            ),
        )


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def manager(tmp_path: Path, publisher: RecordingPublisher) -> Iterator[BuildManager]:
    contexts = ContextStore(tmp_path)
    contexts.path_for(DIGEST).write_bytes(CONTEXT)
    yield BuildManager(MemoryStore(), contexts, publisher, CoordinatorMetrics())


def connect(manager: BuildManager, name: str, native: list[str], emulated: list[str] = [],  # noqa: B006
            slots: int = 2) -> AgentSession:  # fmt: skip
    hello = agent_pb2.AgentHello(
        name=name, builder="sim", native_platforms=native, emulated_platforms=emulated, slots=slots
    )
    return manager.attach_agent(hello, "sim")


def assignments(session: AgentSession) -> list[agent_pb2.Assignment]:
    found = []
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message is not None and message.HasField("assign"):
            found.append(message.assign)
    return found


def spec(platforms: list[str], policy: EmulationPolicy = EmulationPolicy.FALLBACK) -> BuildSpec:
    return BuildSpec(
        DIGEST, "Dockerfile", platforms, ["127.0.0.1:5000/team/app:1"], emulation=policy
    )


def fake_digest(seed: str) -> str:
    """A well-formed digest (the coordinator refuses malformed ones) that names its seed."""
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def pushed(job: agent_pb2.Assignment, digest: str) -> agent_pb2.JobResult:
    return agent_pb2.JobResult(
        job_id=job.job_id, attempt=job.attempt, ok=True, digest=digest, size=512,
        media_type="application/vnd.oci.image.manifest.v1+json",
    )  # fmt: skip


async def test_a_build_runs_on_agents_and_publishes_once_every_job_is_pushed(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    amd = connect(manager, "amd", ["linux/amd64"], ["linux/arm64"])
    build, existing = manager.submit(spec(["linux/amd64", "linux/arm64"]), "key-1")
    assert not existing
    jobs = assignments(amd)
    assert {j.platform for j in jobs} == {"linux/amd64", "linux/arm64"}
    assert {j.repository for j in jobs} == {"127.0.0.1:5000/team/app"}
    assert all(j.attempt == 1 for j in jobs)
    for i, job in enumerate(jobs):
        manager.job_started(AgentEvent("amd", job.job_id, job.attempt))
        manager.job_result(
            AgentEvent("amd", job.job_id, job.attempt), pushed(job, fake_digest(str(i)))
        )
    await poll_until(lambda: manager.get(build.id)[0].state is BuildState.SUCCEEDED, timeout=5,
                     message="build did not succeed")  # fmt: skip
    assert publisher.published == [
        (
            ["127.0.0.1:5000/team/app:1"],
            {j.platform: fake_digest(str(i)) for i, j in enumerate(jobs)},
        )
    ]
    final, final_jobs = manager.get(build.id)
    assert final.index_digest == "sha256:" + "f" * 64
    assert {j.mode.value for j in final_jobs if j.mode} == {"native", "emulated"}
    again, existing = manager.submit(spec(["linux/amd64", "linux/arm64"]), "key-1")
    assert existing and again.id == build.id


async def test_a_lost_agent_requeues_its_job_and_a_late_result_is_ignored(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    first = connect(manager, "first", ["linux/amd64"])
    build, _ = manager.submit(spec(["linux/amd64"]), "")
    (job,) = assignments(first)
    second = connect(manager, "second", ["linux/amd64"])
    manager.detach_agent(first, "went silent (lease expired)")
    (retry,) = assignments(second)
    assert (retry.job_id, retry.attempt) == (job.job_id, 2)
    _, jobs = manager.get(build.id)
    assert jobs[0].requeue_reasons == ["agent first went silent (lease expired)"]
    # the old attempt's result arrives late: ignored, counted
    manager.job_result(AgentEvent("first", job.job_id, 1), pushed(job, fake_digest("stale")))
    assert manager.get(build.id)[1][0].state is JobState.ASSIGNED
    stale = manager.metrics.registry.get_sample_value(
        "polyarch_stale_agent_messages_total", {"kind": "result"}
    )
    assert stale == 1
    manager.job_result(AgentEvent("second", job.job_id, 2), pushed(retry, fake_digest("fresh")))
    await poll_until(lambda: bool(publisher.published), timeout=5, message="not published")
    assert publisher.published[0][1] == {"linux/amd64": fake_digest("fresh")}


async def test_a_failed_platform_publishes_nothing_and_keeps_the_other_digest(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    agent = connect(manager, "a", ["linux/amd64", "linux/arm64"])
    build, _ = manager.submit(spec(["linux/amd64", "linux/arm64"]), "")
    jobs = {j.platform: j for j in assignments(agent)}
    amd, arm = jobs["linux/amd64"], jobs["linux/arm64"]
    manager.job_result(AgentEvent("a", amd.job_id, 1), pushed(amd, fake_digest("amd")))
    failure = agent_pb2.JobResult(job_id=arm.job_id, attempt=1, ok=False,
                                  error="exit code: 3", failed_step="[2/2] RUN false")  # fmt: skip
    manager.job_result(AgentEvent("a", arm.job_id, 1), failure)
    final, final_jobs = manager.get(build.id)
    assert final.state is BuildState.FAILED
    assert "linux/arm64 failed at step '[2/2] RUN false' on agent a" in final.error
    assert {j.platform: j.digest for j in final_jobs}["linux/amd64"] == fake_digest("amd")
    assert publisher.published == []
    assert manager.scheduler.agents["a"].running == set()


async def test_infrastructure_failures_are_retried_elsewhere_then_given_up(
    manager: BuildManager,
) -> None:
    a = connect(manager, "a", ["linux/amd64"], slots=1)
    b = connect(manager, "b", ["linux/amd64"], slots=1)
    build, _ = manager.submit(spec(["linux/amd64"]), "")
    seen = []
    for _ in range(MAX_ATTEMPTS):
        (job,) = assignments(a) + assignments(b)
        seen.append(job.attempt)
        agent = manager.scheduler.agent_of(job.job_id)
        assert agent is not None
        crash = agent_pb2.JobResult(job_id=job.job_id, attempt=job.attempt, ok=False,
                                    error="qemu: uncaught target signal 11", failed_step="build",
                                    infrastructure_error=True)  # fmt: skip
        manager.job_result(AgentEvent(agent, job.job_id, job.attempt), crash)
    assert seen == [1, 2, 3]
    final, jobs = manager.get(build.id)
    assert final.state is BuildState.FAILED
    assert len(jobs[0].requeue_reasons) == MAX_ATTEMPTS - 1


async def test_submit_rejects_what_no_agent_can_build_and_bad_input(
    manager: BuildManager,
) -> None:
    connect(manager, "amd", ["linux/amd64"], ["linux/arm64"])
    with pytest.raises(Unschedulable, match="linux/arm64 with emulation=never"):
        manager.submit(spec(["linux/arm64"], EmulationPolicy.NEVER), "")
    with pytest.raises(Unschedulable, match="linux/s390x"):
        manager.submit(spec(["linux/amd64", "linux/s390x"]), "")
    with pytest.raises(InvalidRequest, match="unknown architecture 'sparc'"):
        manager.submit(spec(["linux/sparc"]), "")
    bad_tags = spec(["linux/amd64"])
    bad_tags.tags = ["127.0.0.1:5000/a:1", "127.0.0.1:5000/b:1"]
    with pytest.raises(InvalidRequest, match="one repository"):
        manager.submit(bad_tags, "")
    missing = spec(["linux/amd64"])
    missing.context_digest = "sha256:" + "0" * 64
    with pytest.raises(NotFound, match="upload it first"):
        manager.submit(missing, "")
    assert manager.store.list_builds(10) == []


async def test_cancel_stops_running_jobs_and_publishes_nothing(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    agent = connect(manager, "a", ["linux/amd64"])
    build, _ = manager.submit(spec(["linux/amd64"]), "")
    (job,) = assignments(agent)
    manager.cancel(build.id, "cancelled by ci")
    cancels = []
    while not agent.outbox.empty():
        message = agent.outbox.get_nowait()
        if message is not None and message.HasField("cancel"):
            cancels.append(message.cancel)
    assert [(c.job_id, c.attempt) for c in cancels] == [(job.job_id, 1)]
    assert manager.get(build.id)[0].state is BuildState.CANCELLED
    manager.job_result(AgentEvent("a", job.job_id, 1), pushed(job, fake_digest("late")))
    await asyncio.sleep(0)
    assert publisher.published == []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def restarted(manager: BuildManager, publisher: RecordingPublisher, clock: Clock) -> BuildManager:
    """A new manager on the same store and contexts, as after a coordinator restart."""
    fresh = BuildManager(manager.store, manager.contexts, publisher, CoordinatorMetrics(), clock)
    fresh.recover(reattach_grace=10)
    return fresh


async def test_after_a_restart_a_returning_agent_keeps_its_job(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    clock = Clock()
    agent = connect(manager, "a", ["linux/amd64"])
    build, _ = manager.submit(spec(["linux/amd64"]), "k")
    (job,) = assignments(agent)
    after = restarted(manager, publisher, clock)
    hello = agent_pb2.AgentHello(
        name="a", builder="sim", native_platforms=["linux/amd64"], slots=2,
        running=[agent_pb2.RunningJob(job_id=job.job_id, attempt=job.attempt)],
    )  # fmt: skip
    back = after.attach_agent(hello, "sim")
    assert assignments(back) == []  # re-attached, not re-sent
    assert after.scheduler.agent_of(job.job_id) == "a"
    clock.now += 60
    after.expire_orphans()
    after.job_result(AgentEvent("a", job.job_id, 1), pushed(job, fake_digest("kept")))
    await poll_until(lambda: bool(publisher.published), timeout=5, message="not published")
    final, jobs = after.get(build.id)
    assert (final.state, jobs[0].attempt) == (BuildState.SUCCEEDED, 1)
    assert after.submit(spec(["linux/amd64"]), "k") == (final, True)


async def test_after_a_restart_a_job_whose_agent_never_returns_is_requeued(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    clock = Clock()
    agent = connect(manager, "gone", ["linux/amd64"], ["linux/arm64"], slots=1)
    queued_build, _ = manager.submit(spec(["linux/amd64", "linux/arm64"]), "")
    (job,) = assignments(agent)  # one slot: arm64 waits in the queue
    after = restarted(manager, publisher, clock)
    other = connect(after, "other", ["linux/amd64", "linux/arm64"])
    (arm,) = assignments(other)  # the queued job survived the restart
    assert arm.platform == "linux/arm64"
    clock.now += 5
    after.expire_orphans()
    assert assignments(other) == []  # still within the grace period
    clock.now += 6
    after.expire_orphans()
    (retry,) = assignments(other)
    assert (retry.job_id, retry.attempt) == (job.job_id, 2)
    _, jobs = after.get(queued_build.id)
    reasons = {j.platform: j.requeue_reasons for j in jobs}
    assert reasons["linux/amd64"] == ["agent gone did not return after a restart"]


def reconnect(manager: BuildManager, name: str, job: agent_pb2.Assignment) -> AgentSession:
    hello = agent_pb2.AgentHello(
        name=name, builder="sim", native_platforms=["linux/amd64"], slots=2,
        running=[agent_pb2.RunningJob(job_id=job.job_id, attempt=job.attempt)],
    )  # fmt: skip
    return manager.attach_agent(hello, "sim")


async def test_an_agent_that_reconnects_keeps_the_attempt_it_still_runs(
    manager: BuildManager,
) -> None:
    first = connect(manager, "a", ["linux/amd64"])
    build, _ = manager.submit(spec(["linux/amd64"]), "")
    (job,) = assignments(first)
    # a second stream for a connected name is refused; the live one is untouched
    with pytest.raises(AlreadyExists, match="agent a is already connected"):
        reconnect(manager, "a", job)
    assert not first.closed and manager.sessions["a"] is first
    _, jobs = manager.get(build.id)
    assert (jobs[0].state, jobs[0].attempt, jobs[0].requeue_reasons) == (JobState.ASSIGNED, 1, [])
    # the old stream is noticed dead (lease): the job is re-queued, then taken back
    manager.detach_agent(first, "went silent (lease expired)")
    assert manager.get(build.id)[1][0].state is JobState.QUEUED
    third = reconnect(manager, "a", job)
    assert assignments(third) == []
    _, jobs = manager.get(build.id)
    assert (jobs[0].state, jobs[0].attempt, jobs[0].agent) == (JobState.RUNNING, 1, "a")
    assert manager.scheduler.queue == {}


async def test_an_idempotency_key_belongs_to_its_owner_and_its_request(
    manager: BuildManager,
) -> None:
    connect(manager, "a", ["linux/amd64", "linux/arm64"])
    first, existing = manager.submit(spec(["linux/amd64"]), "key", owner="token-a")
    assert not existing
    again, existing = manager.submit(spec(["linux/amd64"]), "key", owner="token-a")
    assert existing and again.id == first.id
    # another caller's identical key is another build: keys are scoped to their token
    other, existing = manager.submit(spec(["linux/amd64"]), "key", owner="token-b")
    assert not existing and other.id != first.id
    with pytest.raises(AlreadyExists, match=f"already belongs to build {first.id}"):
        manager.submit(spec(["linux/arm64"]), "key", owner="token-a")


async def test_only_the_owner_or_an_admin_may_cancel(manager: BuildManager) -> None:
    connect(manager, "a", ["linux/amd64"])
    build, _ = manager.submit(spec(["linux/amd64"]), "", owner="token-a")
    with pytest.raises(PermissionDenied, match="another token"):
        manager.may_cancel(build.id, "token-b", is_admin=False)
    manager.may_cancel(build.id, "token-a", is_admin=False)
    manager.may_cancel(build.id, "token-b", is_admin=True)


async def test_a_malformed_result_is_retried_then_fails_naming_the_agent(
    manager: BuildManager,
) -> None:
    agent = connect(manager, "a", ["linux/amd64"])
    build, _ = manager.submit(spec(["linux/amd64"]), "")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        (job,) = assignments(agent)
        assert job.attempt == attempt
        forged = pushed(job, "sha256:not-a-digest")
        manager.job_result(AgentEvent("a", job.job_id, job.attempt), forged)
    final, jobs = manager.get(build.id)
    assert final.state is BuildState.FAILED
    assert "agent a reported a malformed digest" in jobs[0].error


async def test_build_credentials_reach_only_its_assignments_and_are_never_stored(
    manager: BuildManager, publisher: RecordingPublisher, tmp_path: Path
) -> None:
    agent = connect(manager, "a", ["linux/amd64", "linux/arm64"])
    own = check_build_credentials(
        [("127.0.0.1:5000", "ci-bot", "pw-per-build-123")], [("npm", b"npm-secret-456")]
    )
    mine, _ = manager.submit(spec(["linux/amd64"]), "", credentials=own)
    other, _ = manager.submit(spec(["linux/arm64"]), "")
    by_build = {job.build_id: job for job in assignments(agent)}
    assert [(a.registry, a.username, a.password) for a in by_build[mine.id].registry_auths] == [
        ("127.0.0.1:5000", "ci-bot", "pw-per-build-123")
    ]
    assert [(s.id, s.value) for s in by_build[mine.id].secrets] == [("npm", b"npm-secret-456")]
    assert not by_build[other.id].registry_auths and not by_build[other.id].secrets
    assert "pw-per-build" not in repr(manager.vault.get(mine.id))
    stored = manager.store.get_build(mine.id)
    assert stored is not None and stored.spec.secret_ids == ["npm"]
    assert "pw-per-build" not in repr(stored) and "npm-secret" not in repr(stored)

    job = by_build[mine.id]
    manager.job_started(AgentEvent("a", job.job_id, job.attempt))
    manager.job_result(AgentEvent("a", job.job_id, job.attempt), pushed(job, fake_digest("c")))
    await poll_until(lambda: manager.get(mine.id)[0].state is BuildState.SUCCEEDED, timeout=5,
                     message="build did not succeed")  # fmt: skip
    assert publisher.credentials[-1] is own  # the assembly speaks with the build's credentials
    assert manager.vault.get(mine.id) is None  # and forgets them once the build ends


async def test_after_a_restart_a_build_whose_secrets_are_gone_fails_asking_to_resubmit(
    manager: BuildManager, tmp_path: Path
) -> None:
    connect(manager, "a", ["linux/amd64"])
    own = check_build_credentials([], [("token", b"s3cr3t")])
    build, _ = manager.submit(spec(["linux/amd64"]), "", credentials=own)
    after = BuildManager(
        manager.store, manager.contexts, RecordingPublisher(), CoordinatorMetrics()
    )
    after.recover(reattach_grace=10)
    final, jobs = after.get(build.id)
    assert final.state is BuildState.FAILED
    assert "secrets (token) were held in memory only: resubmit it" in final.error
    assert all(job.state is JobState.FAILED for job in jobs)


async def test_an_agent_claiming_absurd_slots_is_refused(manager: BuildManager) -> None:
    hello = agent_pb2.AgentHello(name="greedy", builder="sim", native_platforms=["linux/amd64"],
                                 slots=1000)  # fmt: skip
    with pytest.raises(InvalidRequest, match="slots must be between 1 and 64"):
        manager.attach_agent(hello, "sim")
    assert "greedy" not in manager.sessions


async def test_the_welcome_tells_agents_how_often_to_heartbeat(manager: BuildManager) -> None:
    manager.heartbeat_interval = 2.5
    session = connect(manager, "a", ["linux/amd64"])
    welcome = session.outbox.get_nowait()
    assert welcome is not None and welcome.welcome.heartbeat_interval_ms == 2500

"""The build manager's rules with simulated agents: requeue, fencing, idempotency, failure."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polyarch.coordinator.core.fleet import AgentSession, Assign, Cancel, Welcome
from polyarch.coordinator.core.manager import BuildManager
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
from polyarch.coordinator.core.states import MAX_ATTEMPTS, JobOutcome
from polyarch.coordinator.registry.build_credentials import (
    BuildCredentials,
    check_build_credentials,
)
from polyarch.coordinator.registry.index import ChildManifest, IndexResult
from polyarch.proto.platforms import parse_platform
from tests.support.poll import poll_until
from tests.support.simulated import (
    DIGEST,
    Clock,
    assignments,
    connect,
    fake_digest,
    pushed,
    received,
    started_manager,
)


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
async def manager(tmp_path: Path, publisher: RecordingPublisher) -> AsyncIterator[BuildManager]:
    manager = await started_manager(tmp_path, publisher)
    yield manager
    await manager.close()


def spec(platforms: list[str], policy: EmulationPolicy = EmulationPolicy.FALLBACK) -> BuildSpec:
    return BuildSpec(
        DIGEST, "Dockerfile", platforms, ["127.0.0.1:5000/team/app:1"], emulation=policy
    )


async def state_of(manager: BuildManager, build_id: str) -> BuildState:
    return (await manager.get(build_id))[0].state


async def test_a_build_runs_on_agents_and_publishes_once_every_job_is_pushed(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    amd = connect(manager, "amd", ["linux/amd64"], ("linux/arm64",))
    build, existing = await manager.submit(spec(["linux/amd64", "linux/arm64"]), "key-1")
    assert not existing
    jobs = await assignments(manager, amd)
    assert {j.platform for j in jobs} == {"linux/amd64", "linux/arm64"}
    assert {f"{j.spec.registry}/{j.spec.repository}" for j in jobs} == {"127.0.0.1:5000/team/app"}
    assert all(j.attempt == 1 for j in jobs)
    for i, job in enumerate(jobs):
        manager.job_started("amd", job.job_id, job.attempt)
        manager.job_result("amd", job.job_id, job.attempt, pushed(fake_digest(str(i))))
    await poll_until(lambda: manager.ledger.live(build.id) is None, timeout=5,
                     message="build did not end")  # fmt: skip
    assert publisher.published == [
        (
            ["127.0.0.1:5000/team/app:1"],
            {j.platform: fake_digest(str(i)) for i, j in enumerate(jobs)},
        )
    ]
    final, final_jobs = await manager.get(build.id)
    assert final.state is BuildState.SUCCEEDED
    assert final.index_digest == "sha256:" + "f" * 64
    assert {j.mode.value for j in final_jobs if j.mode} == {"native", "emulated"}
    again, existing = await manager.submit(spec(["linux/amd64", "linux/arm64"]), "key-1")
    assert existing and again.id == build.id


async def test_a_lost_agent_requeues_its_job_and_a_late_result_is_ignored(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    first = connect(manager, "first", ["linux/amd64"])
    build, _ = await manager.submit(spec(["linux/amd64"]), "")
    (job,) = await assignments(manager, first)
    second = connect(manager, "second", ["linux/amd64"])
    manager.detach_agent(first, "went silent (lease expired)")
    (retry,) = await assignments(manager, second)
    assert (retry.job_id, retry.attempt) == (job.job_id, 2)
    _, jobs = await manager.get(build.id)
    assert jobs[0].requeue_reasons == ["agent first went silent (lease expired)"]
    # the old attempt's result arrives late: ignored, counted
    manager.job_result("first", job.job_id, 1, pushed(fake_digest("stale")))
    assert (await manager.get(build.id))[1][0].state is JobState.ASSIGNED
    stale = manager.metrics.registry.get_sample_value(
        "polyarch_stale_agent_messages_total", {"kind": "result"}
    )
    assert stale == 1
    manager.job_result("second", job.job_id, 2, pushed(fake_digest("fresh")))
    await poll_until(lambda: bool(publisher.published), timeout=5, message="not published")
    assert publisher.published[0][1] == {"linux/amd64": fake_digest("fresh")}


async def test_a_failed_platform_publishes_nothing_and_keeps_the_other_digest(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    agent = connect(manager, "a", ["linux/amd64", "linux/arm64"])
    build, _ = await manager.submit(spec(["linux/amd64", "linux/arm64"]), "")
    jobs = {j.platform: j for j in await assignments(manager, agent)}
    amd, arm = jobs["linux/amd64"], jobs["linux/arm64"]
    manager.job_result("a", amd.job_id, 1, pushed(fake_digest("amd")))
    failure = JobOutcome(ok=False, error="exit code: 3", failed_step="[2/2] RUN false")
    manager.job_result("a", arm.job_id, 1, failure)
    final, final_jobs = await manager.get(build.id)
    assert final.state is BuildState.FAILED
    assert "linux/arm64 failed at step '[2/2] RUN false' on agent a" in final.error
    assert {j.platform: j.digest for j in final_jobs}["linux/amd64"] == fake_digest("amd")
    assert publisher.published == []
    assert manager.scheduler.running_on("a") == []


async def test_infrastructure_failures_are_retried_elsewhere_then_given_up(
    manager: BuildManager,
) -> None:
    a = connect(manager, "a", ["linux/amd64"], slots=1)
    b = connect(manager, "b", ["linux/amd64"], slots=1)
    build, _ = await manager.submit(spec(["linux/amd64"]), "")
    seen = []
    for _ in range(MAX_ATTEMPTS):
        (job,) = await assignments(manager, a) + await assignments(manager, b)
        seen.append(job.attempt)
        agent = manager.scheduler.agent_of(job.job_id)
        assert agent is not None
        crash = JobOutcome(ok=False, error="qemu: uncaught target signal 11",
                           failed_step="build", infrastructure_error=True)  # fmt: skip
        manager.job_result(agent, job.job_id, job.attempt, crash)
    assert seen == [1, 2, 3]
    final, jobs = await manager.get(build.id)
    assert final.state is BuildState.FAILED
    assert len(jobs[0].requeue_reasons) == MAX_ATTEMPTS - 1


async def test_submit_rejects_what_no_agent_can_build_and_bad_input(
    manager: BuildManager,
) -> None:
    connect(manager, "amd", ["linux/amd64"], ("linux/arm64",))
    with pytest.raises(Unschedulable, match="linux/arm64 with emulation=never"):
        await manager.submit(spec(["linux/arm64"], EmulationPolicy.NEVER), "")
    with pytest.raises(Unschedulable, match="linux/s390x"):
        await manager.submit(spec(["linux/amd64", "linux/s390x"]), "")
    with pytest.raises(InvalidRequest, match="unknown architecture 'sparc'"):
        await manager.submit(spec(["linux/sparc"]), "")
    bad_tags = spec(["linux/amd64"])
    bad_tags.tags = ["127.0.0.1:5000/a:1", "127.0.0.1:5000/B:1"]
    with pytest.raises(InvalidRequest, match=r"invalid tag '127\.0\.0\.1:5000/B:1'"):
        await manager.submit(bad_tags, "")
    missing = spec(["linux/amd64"])
    missing.context_digest = "sha256:" + "0" * 64
    with pytest.raises(NotFound, match="upload it first"):
        await manager.submit(missing, "")
    assert await manager.list_page(10, None) == []


async def test_cancel_stops_running_jobs_and_publishes_nothing(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    agent = connect(manager, "a", ["linux/amd64"])
    build, _ = await manager.submit(spec(["linux/amd64"]), "")
    (job,) = await assignments(manager, agent)
    await manager.cancel(build.id, "cancelled by ci")
    cancels = await received(manager, agent, Cancel)
    assert [(c.job_id, c.attempt) for c in cancels] == [(job.job_id, 1)]
    assert await state_of(manager, build.id) is BuildState.CANCELLED
    manager.job_result("a", job.job_id, 1, pushed(fake_digest("late")))
    await manager.settle()
    assert publisher.published == []


async def restarted(
    manager: BuildManager, publisher: RecordingPublisher, clock: Clock, tmp_path: Path
) -> BuildManager:
    """A new manager on the same store, as after a coordinator restart."""
    await manager.close()
    return await started_manager(tmp_path, publisher, clock, store=manager.store)


async def test_after_a_restart_a_returning_agent_keeps_its_job(
    manager: BuildManager, publisher: RecordingPublisher, tmp_path: Path
) -> None:
    clock = Clock()
    agent = connect(manager, "a", ["linux/amd64"])
    build, _ = await manager.submit(spec(["linux/amd64"]), "k")
    (job,) = await assignments(manager, agent)
    after = await restarted(manager, publisher, clock, tmp_path)
    back = connect(after, "a", ["linux/amd64"], running=((job.job_id, job.attempt),))
    assert await assignments(after, back) == []  # re-attached, not re-sent
    assert after.scheduler.agent_of(job.job_id) == "a"
    clock.now += 60
    after.expire_orphans()
    after.job_result("a", job.job_id, 1, pushed(fake_digest("kept")))
    await poll_until(lambda: bool(publisher.published), timeout=5, message="not published")
    await poll_until(lambda: after.ledger.live(build.id) is None, timeout=5, message="not ended")
    final, jobs = await after.get(build.id)
    assert (final.state, jobs[0].attempt) == (BuildState.SUCCEEDED, 1)
    again, existing = await after.submit(spec(["linux/amd64"]), "k")
    assert existing and again.id == final.id and again.state is BuildState.SUCCEEDED
    await after.close()


class StuckPublisher(RecordingPublisher):
    """A registry that never answers: the assembly is in flight when the coordinator dies."""

    async def publish(
        self, spec: BuildSpec, jobs: list[JobRecord], own: BuildCredentials | None = None
    ) -> IndexResult:
        await asyncio.Event().wait()
        raise AssertionError("never answers")


async def test_after_a_restart_or_takeover_a_build_whose_jobs_were_all_pushed_is_assembled(
    publisher: RecordingPublisher, tmp_path: Path
) -> None:
    clock = Clock()
    before = await started_manager(tmp_path, StuckPublisher(), clock)
    agent = connect(before, "a", ["linux/amd64", "linux/arm64"])
    build, _ = await before.submit(spec(["linux/amd64", "linux/arm64"]), "")
    placed = await assignments(before, agent)
    assert len(placed) == 2
    for job in placed:
        before.job_result("a", job.job_id, job.attempt, pushed(fake_digest(job.platform)))

    async def assembling() -> bool:
        await before.settle()
        return await state_of(before, build.id) is BuildState.ASSEMBLING

    await poll_until(assembling, timeout=5, message="assembling")
    assert publisher.published == []
    after = await restarted(before, publisher, clock, tmp_path)  # no agent needed back
    await poll_until(lambda: bool(publisher.published), timeout=5, message="not assembled")
    assert publisher.published[0][1].keys() == {"linux/amd64", "linux/arm64"}
    await poll_until(lambda: after.ledger.live(build.id) is None, timeout=5, message="not ended")
    assert await state_of(after, build.id) is BuildState.SUCCEEDED
    await after.close()


async def test_after_a_restart_submits_wait_for_agents_that_were_connected(
    manager: BuildManager, publisher: RecordingPublisher, tmp_path: Path
) -> None:
    """A takeover or restart: the platforms of agents connected a moment ago are accepted
    before they reconnect, and only until the re-attach window ends."""
    clock = Clock()
    connect(manager, "arm", ["linux/arm64"], ("linux/arm/v7",))
    left = connect(manager, "left-long-ago", ["linux/s390x"])
    manager.detach_agent(left, "disconnected")
    clock.now += 60  # it left well before the restart: not expected
    after = await restarted(manager, publisher, clock, tmp_path)
    with pytest.raises(Unschedulable, match="linux/s390x"):
        await after.submit(spec(["linux/s390x"]), "")
    with pytest.raises(Unschedulable, match="linux/arm/v7"):
        await after.submit(spec(["linux/arm/v7"], EmulationPolicy.NEVER), "")
    waiting, _ = await after.submit(spec(["linux/arm64", "linux/arm/v7"]), "")
    back = connect(after, "arm", ["linux/arm64"], ("linux/arm/v7",))
    placed = await assignments(after, back)
    assert sorted(a.platform for a in placed) == ["linux/arm/v7", "linux/arm64"]
    assert {a.build_id for a in placed} == {waiting.id}
    await after.close()


async def test_after_a_takeover_without_the_context_the_build_fails_naming_it(
    manager: BuildManager, publisher: RecordingPublisher, tmp_path: Path
) -> None:
    """A coordinator that takes over with its own context dir (not shared) lacks the
    contexts uploaded to the old one: a build still queued fails saying so; one whose jobs
    are on agents (which have the context) goes on."""
    other = b"another context"
    digest = "sha256:" + hashlib.sha256(other).hexdigest()
    manager.contexts.path_for(digest).write_bytes(other)
    connect(manager, "a", ["linux/amd64"], slots=1)
    on_other = dataclasses.replace(spec(["linux/amd64"]), context_digest=digest)
    kept, _ = await manager.submit(on_other, "")  # runs on "a"
    await manager.settle()
    lost, _ = await manager.submit(on_other, "")  # queued behind it
    await manager.close()
    clock = Clock()
    after = await started_manager(tmp_path / "standby", publisher, clock, store=manager.store)
    failed, jobs = await after.get(lost.id)
    assert failed.state is BuildState.FAILED
    assert f"no copy of the build's context {digest}" in failed.error
    assert "share --context-dir" in jobs[0].error
    assert await state_of(after, kept.id) is BuildState.RUNNING  # waits for "a" to return
    await after.close()


async def test_an_expected_agent_that_never_returns_is_forgotten_after_the_window(
    manager: BuildManager, publisher: RecordingPublisher, tmp_path: Path
) -> None:
    clock = Clock()
    connect(manager, "arm", ["linux/arm64"])
    after = await restarted(manager, publisher, clock, tmp_path)
    await after.submit(spec(["linux/arm64"]), "")  # accepted: "arm" is expected
    clock.now += 11  # past the 10 s re-attach window
    after.expire_orphans()
    with pytest.raises(Unschedulable, match="no connected agent can build linux/arm64"):
        await after.submit(spec(["linux/arm64"]), "")
    await after.store.flush()
    clock.now += 11  # recorded as gone then, so not expected a lease later
    again = await restarted(after, publisher, clock, tmp_path)
    with pytest.raises(Unschedulable, match="linux/arm64"):
        await again.submit(spec(["linux/arm64"]), "")
    await again.close()


async def test_after_a_restart_a_job_whose_agent_never_returns_is_requeued(
    manager: BuildManager, publisher: RecordingPublisher, tmp_path: Path
) -> None:
    clock = Clock()
    agent = connect(manager, "gone", ["linux/amd64"], ("linux/arm64",), slots=1)
    queued_build, _ = await manager.submit(spec(["linux/amd64", "linux/arm64"]), "")
    (job,) = await assignments(manager, agent)  # one slot: arm64 waits in the queue
    after = await restarted(manager, publisher, clock, tmp_path)
    other = connect(after, "other", ["linux/amd64", "linux/arm64"])
    (arm,) = await assignments(after, other)  # the queued job survived the restart
    assert arm.platform == "linux/arm64"
    clock.now += 5
    after.expire_orphans()
    assert await assignments(after, other) == []  # still within the grace period
    clock.now += 6
    after.expire_orphans()
    (retry,) = await assignments(after, other)
    assert (retry.job_id, retry.attempt) == (job.job_id, 2)
    _, jobs = await after.get(queued_build.id)
    reasons = {j.platform: j.requeue_reasons for j in jobs}
    assert reasons["linux/amd64"] == ["agent gone did not return after a restart"]
    await after.close()


def reconnect(manager: BuildManager, name: str, job: Assign) -> AgentSession:
    return connect(manager, name, ["linux/amd64"], running=((job.job_id, job.attempt),))


async def test_an_agent_that_reconnects_keeps_the_attempt_it_still_runs(
    manager: BuildManager,
) -> None:
    first = connect(manager, "a", ["linux/amd64"])
    build, _ = await manager.submit(spec(["linux/amd64"]), "")
    (job,) = await assignments(manager, first)
    # a second stream for a connected name is refused; the live one is untouched
    with pytest.raises(AlreadyExists, match="agent a is already connected"):
        reconnect(manager, "a", job)
    assert not first.closed and manager.sessions["a"] is first
    _, jobs = await manager.get(build.id)
    assert (jobs[0].state, jobs[0].attempt, jobs[0].requeue_reasons) == (JobState.ASSIGNED, 1, [])
    # the old stream is noticed dead (lease): the job is re-queued, then taken back
    manager.detach_agent(first, "went silent (lease expired)")
    assert (await manager.get(build.id))[1][0].state is JobState.QUEUED
    third = reconnect(manager, "a", job)
    assert await assignments(manager, third) == []
    _, jobs = await manager.get(build.id)
    assert (jobs[0].state, jobs[0].attempt, jobs[0].agent) == (JobState.RUNNING, 1, "a")
    assert manager.scheduler.queued_by_platform() == {}


async def test_an_idempotency_key_belongs_to_its_owner_and_its_request(
    manager: BuildManager,
) -> None:
    connect(manager, "a", ["linux/amd64", "linux/arm64"])
    first, existing = await manager.submit(spec(["linux/amd64"]), "key", owner="token-a")
    assert not existing
    again, existing = await manager.submit(spec(["linux/amd64"]), "key", owner="token-a")
    assert existing and again.id == first.id
    # another caller's identical key is another build: keys are scoped to their token
    other, existing = await manager.submit(spec(["linux/amd64"]), "key", owner="token-b")
    assert not existing and other.id != first.id
    with pytest.raises(AlreadyExists, match=f"already belongs to build {first.id}"):
        await manager.submit(spec(["linux/arm64"]), "key", owner="token-a")


async def test_concurrent_submits_with_one_key_make_one_build(manager: BuildManager) -> None:
    connect(manager, "a", ["linux/amd64"])
    results = await asyncio.gather(
        *(manager.submit(spec(["linux/amd64"]), "same", owner="t") for _ in range(5))
    )
    assert len({build.id for build, _ in results}) == 1
    assert sorted(existing for _, existing in results) == [False, True, True, True, True]


async def test_a_cache_spec_an_agent_cannot_honour_is_refused_at_submit(
    manager: BuildManager,
) -> None:
    connect(manager, "docker-1", ["linux/amd64"], builder="docker")
    connect(manager, "buildah-1", ["linux/arm64"], builder="buildah")
    registry_cache = "type=registry,ref=127.0.0.1:5000/team/cache"
    with_cache = spec(["linux/amd64"])
    with_cache.cache_to = [registry_cache]
    with pytest.raises(InvalidRequest) as caught:
        await manager.submit(with_cache, "")
    assert str(caught.value) == (
        f"--cache-to {registry_cache!r}: docker agents export only type=inline caches "
        "(agent docker-1 could take linux/amd64)"
    )
    inline = spec(["linux/amd64"])
    inline.cache_to, inline.cache_from = ["type=inline"], ["127.0.0.1:5000/team/app:1"]
    assert not (await manager.submit(inline, ""))[1]  # what docker does is accepted
    on_buildah = spec(["linux/arm64"])
    on_buildah.cache_to = [registry_cache]
    assert not (await manager.submit(on_buildah, ""))[1]
    local = spec(["linux/arm64"])
    local.cache_from = ["type=local,src=/tmp/cache"]
    with pytest.raises(InvalidRequest, match="buildah agents import only type=registry caches"):
        await manager.submit(local, "")


async def test_cache_modes_a_builder_cannot_export_and_extra_buildah_caches_are_refused(
    manager: BuildManager,
) -> None:
    connect(manager, "docker-1", ["linux/amd64"], builder="docker")
    connect(manager, "buildah-1", ["linux/arm64"], builder="buildah")
    inline_max = spec(["linux/amd64"])
    inline_max.cache_to = ["type=inline,mode=max"]
    with pytest.raises(InvalidRequest) as caught:
        await manager.submit(inline_max, "")
    assert str(caught.value) == (
        "--cache-to 'type=inline,mode=max': docker agents export only inline caches, which "
        "hold the final image's layers (mode=min); mode=max needs a registry cache exporter, "
        "which `docker build` without buildx lacks (agent docker-1 could take linux/amd64)"
    )
    registry_max = spec(["linux/arm64"])
    registry_max.cache_to = ["type=registry,ref=127.0.0.1:5000/team/cache:b,mode=max"]
    assert not (await manager.submit(registry_max, ""))[1]  # what buildah does anyway
    two = spec(["linux/arm64"])
    two.cache_from = ["127.0.0.1:5000/team/cache", "127.0.0.1:5000/other/cache"]
    with pytest.raises(InvalidRequest) as caught:
        await manager.submit(two, "")
    assert str(caught.value) == (
        "--cache-from: buildah agents take one --cache-from (buildah keeps only the last it is "
        "given) (agent buildah-1 could take linux/arm64)"
    )
    either = spec(["linux/amd64", "linux/arm64"])
    either.cache_to = ["type=registry,ref=127.0.0.1:5000/team/cache,mode=max"]
    with pytest.raises(InvalidRequest, match="docker agents export only type=inline caches"):
        await manager.submit(either, "")  # the amd64 job could go to the docker agent


async def test_tags_in_several_repositories_push_to_the_first(manager: BuildManager) -> None:
    connect(manager, "a", ["linux/amd64"])
    several = spec(["linux/amd64"])
    several.tags = ["127.0.0.1:5000/team/app:1", "127.0.0.1:6000/mirror/app:1", "user/app"]
    build, _ = await manager.submit(several, "")
    assert (build.spec.registry, build.spec.repository) == ("127.0.0.1:5000", "team/app")
    assert build.spec.tags[2] == "docker.io/user/app:latest"


async def test_tags_are_stored_normalised_the_docker_way(manager: BuildManager) -> None:
    connect(manager, "a", ["linux/amd64"])
    given = spec(["linux/amd64"])
    given.tags = ["127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app:1"]
    build, _ = await manager.submit(given, "")
    assert build.spec.tags == ["127.0.0.1:5000/team/app:latest", "127.0.0.1:5000/team/app:1"]
    hub = spec(["linux/amd64"])
    hub.tags = ["app"]
    build, _ = await manager.submit(hub, "")
    assert (build.spec.registry, build.spec.repository) == ("docker.io", "library/app")
    assert build.spec.tags == ["docker.io/library/app:latest"]


async def test_only_the_owner_or_an_admin_check_owner(manager: BuildManager) -> None:
    connect(manager, "a", ["linux/amd64"])
    build, _ = await manager.submit(spec(["linux/amd64"]), "", owner="token-a")
    with pytest.raises(PermissionDenied, match="another token"):
        await manager.check_owner(build.id, "token-b", is_admin=False)
    await manager.check_owner(build.id, "token-a", is_admin=False)
    await manager.check_owner(build.id, "token-b", is_admin=True)


async def test_a_malformed_result_is_retried_then_fails_naming_the_agent(
    manager: BuildManager,
) -> None:
    agent = connect(manager, "a", ["linux/amd64"])
    build, _ = await manager.submit(spec(["linux/amd64"]), "")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        (job,) = await assignments(manager, agent)
        assert job.attempt == attempt
        manager.job_result("a", job.job_id, job.attempt, pushed("sha256:not-a-digest"))
    final, jobs = await manager.get(build.id)
    assert final.state is BuildState.FAILED
    assert "agent a reported a malformed digest" in jobs[0].error


async def test_build_credentials_reach_only_its_assignments_and_are_never_stored(
    manager: BuildManager, publisher: RecordingPublisher
) -> None:
    agent = connect(manager, "a", ["linux/amd64", "linux/arm64"])
    own = check_build_credentials(
        [("127.0.0.1:5000", "ci-bot", "pw-per-build-123")], [("npm", b"npm-secret-456")]
    )
    mine, _ = await manager.submit(spec(["linux/amd64"]), "", credentials=own)
    other, _ = await manager.submit(spec(["linux/arm64"]), "")
    by_build = {job.build_id: job for job in await assignments(manager, agent)}
    assert by_build[mine.id].credentials is own
    assert by_build[other.id].credentials.empty
    assert "pw-per-build" not in repr(manager.vault.get(mine.id))
    await manager.settle()
    stored = await manager.store.get_build(mine.id)
    assert stored is not None and stored.spec.secret_ids == ["npm"]
    assert "pw-per-build" not in repr(stored) and "npm-secret" not in repr(stored)

    job = by_build[mine.id]
    manager.job_started("a", job.job_id, job.attempt)
    manager.job_result("a", job.job_id, job.attempt, pushed(fake_digest("c")))
    await poll_until(lambda: manager.ledger.live(mine.id) is None, timeout=5,
                     message="build did not end")  # fmt: skip
    assert await state_of(manager, mine.id) is BuildState.SUCCEEDED
    assert publisher.credentials[-1] is own  # the assembly speaks with the build's credentials
    assert manager.vault.get(mine.id) is None  # and forgets them once the build ends


async def test_after_a_restart_a_build_whose_secrets_are_gone_fails_asking_to_resubmit(
    manager: BuildManager, tmp_path: Path
) -> None:
    connect(manager, "a", ["linux/amd64"])
    own = check_build_credentials([], [("token", b"s3cr3t")])
    build, _ = await manager.submit(spec(["linux/amd64"]), "", credentials=own)
    after = await restarted(manager, RecordingPublisher(), Clock(), tmp_path)
    final, jobs = await after.get(build.id)
    assert final.state is BuildState.FAILED
    assert "secrets (token) were held in memory only: resubmit it" in final.error
    assert all(job.state is JobState.FAILED for job in jobs)
    await after.close()


async def test_an_agent_claiming_absurd_slots_is_refused(manager: BuildManager) -> None:
    with pytest.raises(InvalidRequest, match="slots must be between 1 and 64"):
        connect(manager, "greedy", ["linux/amd64"], slots=1000)
    assert "greedy" not in manager.sessions


async def test_the_welcome_tells_agents_how_often_to_heartbeat(manager: BuildManager) -> None:
    manager.heartbeat_interval = 2.5
    session = connect(manager, "a", ["linux/amd64"])
    welcome = session.outbox.get_nowait()
    assert isinstance(welcome, Welcome) and welcome.heartbeat_interval == 2.5


def test_the_request_hash_is_the_one_stored_builds_carry() -> None:
    """spec_json skips asdict's deep copies but must give the same text: builds stored before
    compare their idempotent resubmits against hashes of that text."""
    import dataclasses
    import json

    from polyarch.coordinator.core.model import spec_json

    full = spec(["linux/amd64", "linux/arm64"])
    full.build_args, full.labels, full.cache_from = {"A": "1"}, {"l": "v"}, ["r/c:1"]
    later = ("no_cache", "pull", "annotations", "no_publish", "scan_command", "provenance",
             "sign")  # fmt: skip
    old_fields = {k: v for k, v in dataclasses.asdict(full).items() if k not in later}
    assert spec_json(full) == json.dumps(old_fields, sort_keys=True, default=str)
    full.no_cache = True  # a field added later counts once it is set
    assert json.loads(spec_json(full))["no_cache"] is True

"""The StateStore contract, run against every backend (SQLite and memory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from polyarch.coordinator.core.model import (
    BuildRecord,
    BuildSpec,
    BuildState,
    EmulationPolicy,
    JobRecord,
    JobState,
    Mode,
)
from polyarch.coordinator.core.store import (
    DuplicateIdempotencyKey,
    MemoryStore,
    SQLiteStore,
    StateStore,
)


def make_build(
    build_id: str, created_at: float, key: str = ""
) -> tuple[BuildRecord, list[JobRecord]]:
    spec = BuildSpec(
        context_digest="sha256:" + "a" * 64,
        dockerfile="Dockerfile",
        platforms=["linux/amd64", "linux/arm64"],
        tags=["127.0.0.1:5000/team/app:1"],
        build_args={"VERSION": "1"},
        emulation=EmulationPolicy.ALLOW,
        registry="127.0.0.1:5000",
        repository="team/app",
    )
    build = BuildRecord(id=build_id, spec=spec, created_at=created_at, idempotency_key=key)
    jobs = [
        JobRecord(id=f"{build_id}-{p}", build_id=build_id, platform=p, queued_at=created_at)
        for p in spec.platforms
    ]
    return build, jobs


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    backend: StateStore = (
        SQLiteStore(tmp_path / "state.sqlite3") if request.param == "sqlite" else MemoryStore()
    )
    yield backend
    backend.close()


def test_create_and_read_back_a_build_with_its_jobs(store: StateStore) -> None:
    build, jobs = make_build("b1", 10.0, key="k1")
    store.create_build(build, jobs)
    loaded = store.get_build("b1")
    assert loaded == build
    assert loaded is not build
    assert [j.platform for j in store.jobs_of("b1")] == ["linux/amd64", "linux/arm64"]
    assert store.find_by_idempotency_key("k1") == build
    assert store.find_by_idempotency_key("other") is None
    assert store.get_build("missing") is None


def test_duplicate_idempotency_key_names_the_first_build(store: StateStore) -> None:
    store.create_build(*make_build("b1", 1.0, key="same"))
    with pytest.raises(DuplicateIdempotencyKey) as raised:
        store.create_build(*make_build("b2", 2.0, key="same"))
    assert raised.value.build_id == "b1"
    assert store.get_build("b2") is None
    assert store.jobs_of("b2") == []


def test_builds_without_a_key_never_collide(store: StateStore) -> None:
    store.create_build(*make_build("b1", 1.0))
    store.create_build(*make_build("b2", 2.0))
    assert [b.id for b in store.list_builds(10)] == ["b2", "b1"]
    assert [b.id for b in store.list_builds(1)] == ["b2"]


def test_pages_are_newest_first_and_hold_every_build_exactly_once(store: StateStore) -> None:
    """Builds created at the same instant are ordered by id, so a cursor never skips one."""
    times = [5.0, 3.0, 5.0, 1.0, 3.0, 5.0, 2.0]
    for i, at in enumerate(times):
        store.create_build(*make_build(f"b{i}", at))
    expected = [b.id for b in sorted(
        (make_build(f"b{i}", at)[0] for i, at in enumerate(times)),
        key=lambda b: (b.created_at, b.id), reverse=True)]  # fmt: skip
    seen: list[str] = []
    before: tuple[float, str] | None = None
    while page := store.list_builds_page(3, before):
        assert len(page) <= 3
        seen += [b.id for b in page]
        before = (page[-1].created_at, page[-1].id)
    assert seen == expected
    assert store.list_builds_page(2) == store.list_builds_page(2, None)
    assert [b.id for b in store.list_builds_page(10, (3.0, "b4"))] == ["b1", "b6", "b3"]
    assert store.list_builds_page(10, (1.0, "b3")) == []


def test_a_page_is_a_copy_and_later_builds_do_not_shift_an_open_cursor(
    store: StateStore,
) -> None:
    for i in range(4):
        store.create_build(*make_build(f"b{i}", float(i)))
    first = store.list_builds_page(2)
    first[0].error = "changed only in the copy"
    store.create_build(*make_build("b9", 9.0))  # newer than the cursor: not on later pages
    rest = store.list_builds_page(10, (first[-1].created_at, first[-1].id))
    assert [b.id for b in first + rest] == ["b3", "b2", "b1", "b0"]
    stored = store.get_build("b3")
    assert stored is not None and stored.error == ""


def test_saved_changes_persist_and_reads_are_copies(store: StateStore) -> None:
    build, jobs = make_build("b1", 1.0)
    store.create_build(build, jobs)
    job = store.jobs_of("b1")[0]
    job.state, job.agent, job.mode, job.attempt = JobState.ASSIGNED, "a1", Mode.EMULATED, 1
    job.requeue_reasons.append("agent a0 went silent")
    store.jobs_of("b1")[1].state = JobState.FAILED  # a copy: not saved
    store.save_job(job, "assigned to a1", 2.0)
    build.state, build.index_digest = BuildState.SUCCEEDED, "sha256:" + "b" * 64
    store.save_build(build)
    stored = store.jobs_of("b1")
    assert stored[0] == job
    assert stored[1].state is JobState.QUEUED
    assert store.get_build("b1") == build


def test_unfinished_builds_are_oldest_first_and_exclude_terminal(store: StateStore) -> None:
    for i, state in enumerate(
        [BuildState.RUNNING, BuildState.SUCCEEDED, BuildState.QUEUED, BuildState.CANCELLED]
    ):
        build, jobs = make_build(f"b{i}", float(i))
        build.state = state
        store.create_build(build, jobs)
    assert [b.id for b in store.unfinished_builds()] == ["b0", "b2"]


def test_every_state_change_is_recorded_as_a_transition(store: StateStore) -> None:
    build, jobs = make_build("b1", 1.0)
    store.create_build(build, jobs)
    job = jobs[0]
    for state, attempt, reason in [
        (JobState.ASSIGNED, 1, "assigned to a1"),
        (JobState.RUNNING, 1, "started"),
        (JobState.RUNNING, 1, "a log line changes nothing"),
        (JobState.QUEUED, 1, "agent a1 went silent"),
        (JobState.ASSIGNED, 2, "assigned to a2"),
    ]:
        job.state, job.attempt = state, attempt
        store.save_job(job, reason, 3.0)
    assert store.transitions(job.id) == [
        (0, "queued", "submitted"),
        (1, "assigned", "assigned to a1"),
        (1, "running", "started"),
        (1, "queued", "agent a1 went silent"),
        (2, "assigned", "assigned to a2"),
    ]


def test_sqlite_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    first = SQLiteStore(path)
    build, jobs = make_build("b1", 1.0, key="k")
    first.create_build(build, jobs)
    first.close()
    second = SQLiteStore(path)
    try:
        assert second.get_build("b1") == build
        assert len(second.jobs_of("b1")) == 2
    finally:
        second.close()

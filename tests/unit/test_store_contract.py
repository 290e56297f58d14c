"""The StateStore contract, run against every backend (SQLite, PostgreSQL and memory)."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
from polyarch.coordinator.core.postgres_store import PostgresStore
from polyarch.coordinator.core.presence import AgentPresence
from polyarch.coordinator.core.sqlite_store import SQLiteStore
from polyarch.coordinator.core.store import (
    DuplicateIdempotencyKey,
    MemoryStore,
    StateStore,
    StoreClosed,
    StoreError,
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


class Commits:
    """observe_batch: records each commit's size. For SQLiteStore it can hold the writer
    thread after a commit, so every write queued meanwhile lands in the next one (the
    PostgreSQL writer is a task on the loop: calls made without awaiting share a batch)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._open = threading.Event()
        self._open.set()
        self._held = threading.Event()

    def __call__(self, writes: int) -> None:
        self.sizes.append(writes)
        if not self._open.is_set():
            self._held.set()
            assert self._open.wait(timeout=60), "the writer was held too long"

    async def hold(self, store: StateStore) -> None:
        """Returns once the writer thread waits (after one commit) for release()."""
        if isinstance(store, SQLiteStore):
            self._open.clear()
            self._held.clear()
            store.save_build(make_build("hold", 0.0)[0])
            assert await asyncio.to_thread(self._held.wait, 60)

    def release(self) -> None:
        self._open.set()


@pytest.fixture
def commits() -> Commits:
    return Commits()


@pytest.fixture(params=["sqlite", "postgres", "memory"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, commits: Commits
) -> AsyncIterator[StateStore]:
    backend: StateStore
    if request.param == "sqlite":
        backend = SQLiteStore(tmp_path / "state.sqlite3", observe_batch=commits)
    elif request.param == "postgres":  # a new database per test, on the session's server
        backend = await PostgresStore.open(
            request.getfixturevalue("postgres_dsn"), observe_batch=commits
        )
    else:
        backend = MemoryStore()
    yield backend
    commits.release()
    await backend.close()


async def test_create_and_read_back_a_build_with_its_jobs(store: StateStore) -> None:
    build, jobs = make_build("b1", 10.0, key="k1")
    await store.create_build(build, jobs)
    loaded = await store.get_build("b1")
    assert loaded == build
    assert loaded is not build
    assert [j.platform for j in await store.jobs_of("b1")] == ["linux/amd64", "linux/arm64"]
    assert await store.find_by_idempotency_key("k1") == build
    assert await store.find_by_idempotency_key("other") is None
    assert await store.find_by_idempotency_key("") is None
    assert await store.get_build("missing") is None


async def test_every_spec_field_round_trips(store: StateStore) -> None:
    build, jobs = make_build("b1", 10.0)
    build.spec.no_cache, build.spec.pull, build.spec.secret_ids = True, True, ["npm"]
    await store.create_build(build, jobs)
    loaded = await store.get_build("b1")
    assert loaded is not None and loaded.spec == build.spec
    jobs[0].config_digest = "sha256:" + "c" * 64
    await store.save_job(jobs[0], "verified", 11.0)
    assert (await store.jobs_of("b1"))[0].config_digest == jobs[0].config_digest


async def test_duplicate_idempotency_key_names_the_first_build(store: StateStore) -> None:
    await store.create_build(*make_build("b1", 1.0, key="same"))
    with pytest.raises(DuplicateIdempotencyKey) as raised:
        await store.create_build(*make_build("b2", 2.0, key="same"))
    assert raised.value.build_id == "b1"
    assert await store.get_build("b2") is None
    assert await store.jobs_of("b2") == []


async def test_a_duplicate_key_in_one_batch_fails_only_that_build(
    store: StateStore, commits: Commits
) -> None:
    await commits.hold(store)
    first = store.create_build(*make_build("b1", 1.0, key="same"))
    second = store.create_build(*make_build("b2", 2.0, key="same"))
    third = store.create_build(*make_build("b3", 3.0, key="other"))
    job = make_build("b1", 1.0)[1][0]
    job.state = JobState.ASSIGNED
    fourth = store.save_job(job, "assigned", 4.0)
    commits.release()
    results = await asyncio.gather(first, second, third, fourth, return_exceptions=True)
    assert results[0] is None and results[2] is None and results[3] is None
    assert isinstance(results[1], DuplicateIdempotencyKey) and results[1].build_id == "b1"
    if isinstance(store, SQLiteStore | PostgresStore):
        assert commits.sizes[-1] == 4  # one transaction held all four
    assert await store.get_build("b2") is None
    assert await store.jobs_of("b2") == []
    assert await store.transitions("b2-linux/amd64") == []
    listed = [b.id for b in await store.list_builds_page(10) if b.id != "hold"]
    assert listed == ["b3", "b1"]
    assert (await store.jobs_of("b1"))[0].state is JobState.ASSIGNED


async def test_builds_without_a_key_never_collide(store: StateStore) -> None:
    await store.create_build(*make_build("b1", 1.0))
    await store.create_build(*make_build("b2", 2.0))
    assert [b.id for b in await store.list_builds_page(10)] == ["b2", "b1"]
    assert [b.id for b in await store.list_builds_page(1)] == ["b2"]


async def test_pages_are_newest_first_and_hold_every_build_exactly_once(
    store: StateStore,
) -> None:
    """Builds created at the same instant are ordered by id, so a cursor never skips one."""
    times = [5.0, 3.0, 5.0, 1.0, 3.0, 5.0, 2.0]
    for i, at in enumerate(times):
        store.create_build(*make_build(f"b{i}", at))  # fire and forget: reads come after
    expected = [b.id for b in sorted(
        (make_build(f"b{i}", at)[0] for i, at in enumerate(times)),
        key=lambda b: (b.created_at, b.id), reverse=True)]  # fmt: skip
    seen: list[str] = []
    before: tuple[float, str] | None = None
    while page := await store.list_builds_page(3, before):
        assert len(page) <= 3
        seen += [b.id for b in page]
        before = (page[-1].created_at, page[-1].id)
    assert seen == expected
    assert await store.list_builds_page(2) == await store.list_builds_page(2, None)
    assert [b.id for b in await store.list_builds_page(10, (3.0, "b4"))] == ["b1", "b6", "b3"]
    assert await store.list_builds_page(10, (1.0, "b3")) == []


async def test_a_page_is_a_copy_and_later_builds_do_not_shift_an_open_cursor(
    store: StateStore,
) -> None:
    for i in range(4):
        store.create_build(*make_build(f"b{i}", float(i)))
    first = await store.list_builds_page(2)
    first[0].error = "changed only in the copy"
    store.create_build(*make_build("b9", 9.0))  # newer than the cursor: not on later pages
    rest = await store.list_builds_page(10, (first[-1].created_at, first[-1].id))
    assert [b.id for b in first + rest] == ["b3", "b2", "b1", "b0"]
    stored = await store.get_build("b3")
    assert stored is not None and stored.error == ""


async def test_saved_changes_persist_and_reads_are_copies(store: StateStore) -> None:
    build, jobs = make_build("b1", 1.0)
    await store.create_build(build, jobs)
    job = (await store.jobs_of("b1"))[0]
    job.state, job.agent, job.mode, job.attempt = JobState.ASSIGNED, "a1", Mode.EMULATED, 1
    job.requeue_reasons.append("agent a0 went silent")
    (await store.jobs_of("b1"))[1].state = JobState.FAILED  # a copy: not saved
    await store.save_job(job, "assigned to a1", 2.0)
    build.state, build.index_digest = BuildState.SUCCEEDED, "sha256:" + "b" * 64
    await store.save_build(build)
    stored = await store.jobs_of("b1")
    assert stored[0] == job
    assert stored[1].state is JobState.QUEUED
    assert await store.get_build("b1") == build


async def test_a_write_stores_the_record_as_it_was_at_the_call(
    store: StateStore, commits: Commits
) -> None:
    build, jobs = make_build("b1", 1.0)
    await store.create_build(build, jobs)
    await commits.hold(store)  # nothing commits until after the mutations below
    job = jobs[0]
    job.state, job.agent = JobState.ASSIGNED, "a1"
    saved_job = store.save_job(job, "assigned to a1", 2.0)
    build.error = "at call time"
    saved_build = store.save_build(build)
    job.state, job.agent = JobState.FAILED, "mutated later"
    job.requeue_reasons.append("mutated later")
    build.error, build.spec.tags[0] = "mutated later", "mutated later"
    commits.release()
    await asyncio.gather(saved_job, saved_build)
    stored_job = (await store.jobs_of("b1"))[0]
    assert (stored_job.state, stored_job.agent, stored_job.requeue_reasons) == (
        JobState.ASSIGNED,
        "a1",
        [],
    )
    stored_build = await store.get_build("b1")
    assert stored_build is not None
    assert stored_build.error == "at call time"
    assert stored_build.spec.tags == ["127.0.0.1:5000/team/app:1"]


async def test_a_read_sees_every_write_queued_before_it(store: StateStore) -> None:
    build, jobs = make_build("b1", 1.0)
    store.create_build(build, jobs)
    job = jobs[0]
    for state in (JobState.ASSIGNED, JobState.RUNNING, JobState.PUSHED):
        job.state = state
        store.save_job(job, state.value, 2.0)  # never awaited
    build.state = BuildState.SUCCEEDED
    store.save_build(build)
    assert [state for _, state, _ in await store.transitions(job.id)] == [
        "queued",
        "assigned",
        "running",
        "pushed",
    ]
    stored = await store.get_build("b1")
    assert stored is not None and stored.state is BuildState.SUCCEEDED
    assert await store.unfinished_builds() == []


async def test_jobs_of_many_returns_each_builds_jobs_in_creation_order(
    store: StateStore,
) -> None:
    for i in range(3):
        store.create_build(*make_build(f"b{i}", float(i)))
    found = await store.jobs_of_many(["b2", "b0", "missing"])
    assert set(found) == {"b2", "b0", "missing"}
    assert [j.id for j in found["b2"]] == ["b2-linux/amd64", "b2-linux/arm64"]
    assert [j.id for j in found["b0"]] == ["b0-linux/amd64", "b0-linux/arm64"]
    assert found["missing"] == []
    assert await store.jobs_of_many([]) == {}


async def test_jobs_of_many_is_one_query(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.sqlite3")
    try:
        for i in range(50):
            store.create_build(*make_build(f"b{i}", float(i)))
        await store.flush()
        statements: list[str] = []
        await store._read(lambda db: db.set_trace_callback(statements.append))
        found = await store.jobs_of_many([f"b{i}" for i in range(50)])
        await store._read(lambda db: db.set_trace_callback(None))
        assert sum(len(jobs) for jobs in found.values()) == 100
        assert len([s for s in statements if "FROM jobs" in s]) == 1
    finally:
        await store.close()


async def test_unfinished_builds_are_oldest_first_and_exclude_terminal(
    store: StateStore,
) -> None:
    for i, state in enumerate(
        [BuildState.RUNNING, BuildState.SUCCEEDED, BuildState.QUEUED, BuildState.CANCELLED]
    ):
        build, jobs = make_build(f"b{i}", float(i))
        build.state = state
        store.create_build(build, jobs)
    assert [b.id for b in await store.unfinished_builds()] == ["b0", "b2"]


async def test_every_state_change_is_recorded_as_a_transition(store: StateStore) -> None:
    build, jobs = make_build("b1", 1.0)
    await store.create_build(build, jobs)
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
    assert await store.transitions(job.id) == [
        (0, "queued", "submitted"),
        (1, "assigned", "assigned to a1"),
        (1, "running", "started"),
        (1, "queued", "agent a1 went silent"),
        (2, "assigned", "assigned to a2"),
    ]


async def test_a_cancelled_future_does_not_cancel_its_write(store: StateStore) -> None:
    saving = store.create_build(*make_build("b1", 1.0))
    saving.cancel()
    await store.flush()
    assert await store.get_build("b1") is not None


async def test_close_flushes_is_idempotent_and_refuses_later_calls(
    store: StateStore, tmp_path: Path
) -> None:
    store.create_build(*make_build("b1", 1.0))  # never awaited: close still makes it durable
    await asyncio.gather(store.close(), store.close())
    await store.close()
    if isinstance(store, SQLiteStore):
        reopened = SQLiteStore(tmp_path / "state.sqlite3")
        assert await reopened.get_build("b1") is not None
        await reopened.close()
    late = store.save_build(make_build("b2", 2.0)[0])
    with pytest.raises(StoreClosed):
        await late
    with pytest.raises(StoreClosed):
        await store.get_build("b1")


async def test_failed_writes_nobody_awaits_are_logged_not_warned_about(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await store.create_build(*make_build("b1", 1.0, key="same"))
    store.create_build(*make_build("b2", 2.0, key="same"))  # fails; nobody looks
    await store.flush()
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text
    assert "idempotency key already used by build b1" in caplog.text


async def test_a_backend_failure_is_a_store_error_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteStore(tmp_path / "state.sqlite3")
    try:
        await store.create_build(*make_build("b1", 1.0))
        store.create_build(*make_build("b1", 1.0))  # the same id again: fails, nobody looks
        again = store.create_build(*make_build("b1", 1.0))
        with pytest.raises(StoreError) as raised:
            await again
        assert not isinstance(raised.value, sqlite3.Error)
        gc.collect()
        await asyncio.sleep(0)
        assert "never retrieved" not in caplog.text
        assert any(r.levelno == logging.ERROR and "store write failed" in r.message
                   for r in caplog.records)  # fmt: skip
        assert len(await store.jobs_of("b1")) == 2  # the first build is untouched
    finally:
        await store.close()


async def test_many_concurrent_writes_share_commits(tmp_path: Path) -> None:
    commits = Commits()
    latencies: list[float] = []
    store = SQLiteStore(tmp_path / "state.sqlite3", latencies.append, commits)
    try:
        await commits.hold(store)

        async def lifecycle(i: int) -> None:
            build, jobs = make_build(f"b{i}", float(i))
            await store.create_build(build, jobs)
            for state in (JobState.ASSIGNED, JobState.RUNNING, JobState.PUSHED):
                for job in jobs:
                    job.state = state
                    await store.save_job(job, state.value, 2.0)

        tasks = [asyncio.create_task(lifecycle(i)) for i in range(40)]
        await asyncio.sleep(0)  # every task queues its create_build while the writer is held
        commits.release()
        await asyncio.gather(*tasks)
        writes = 1 + 40 * 7
        assert sum(commits.sizes) == writes
        assert len(latencies) == writes
        assert commits.sizes[1] == 40  # the creates queued meanwhile: one commit
        assert len(commits.sizes) < writes
    finally:
        await store.close()


async def test_a_write_is_durable_once_its_future_resolves(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    first = SQLiteStore(path)
    build, jobs = make_build("b1", 1.0, key="k")
    await first.create_build(build, jobs)
    # the files as they are now (no close, no checkpoint: as after a crash) hold the build
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("state.sqlite3", "state.sqlite3-wal"):
        shutil.copyfile(tmp_path / name, crashed / name)
    await first.close()
    second = SQLiteStore(crashed / "state.sqlite3")
    try:
        assert await second.get_build("b1") == build
        assert len(await second.jobs_of("b1")) == 2
        assert await second.find_by_idempotency_key("k") == build
    finally:
        await second.close()


async def test_an_old_database_gains_the_added_columns(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE builds (id TEXT PRIMARY KEY, state TEXT NOT NULL, spec TEXT NOT NULL, "
        "created_at REAL NOT NULL, finished_at REAL, idempotency_key TEXT UNIQUE, "
        "index_digest TEXT NOT NULL DEFAULT '', index_media_type TEXT NOT NULL DEFAULT '', "
        "index_size INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '')"
    )
    old.commit()
    old.close()
    store = SQLiteStore(path)
    try:
        build, jobs = make_build("b1", 1.0)
        build.owner, build.request_hash = "token-1", "sha256:abc"
        await store.create_build(build, jobs)
        assert await store.get_build("b1") == build
    finally:
        await store.close()


class FailingCommit:
    """A connection whose next COMMIT fails, as on a full disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.fail_next = True

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)


async def test_a_failed_commit_fails_its_whole_batch_and_the_store_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    commits = Commits()
    store = SQLiteStore(tmp_path / "state.sqlite3", observe_batch=commits)
    try:
        await commits.hold(store)
        store._db = FailingCommit(store._db)  # type: ignore[assignment]  # the writer is held
        lost = [store.create_build(*make_build(f"b{i}", float(i))) for i in range(3)]
        reading = asyncio.ensure_future(store.get_build("b0"))
        await asyncio.sleep(0)  # the read is queued behind the writes
        commits.release()
        results = await asyncio.gather(*lost, reading, return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results)  # the read saw nothing undurable
        assert "never retrieved" not in caplog.text
        await store.create_build(*make_build("b9", 9.0))
        # ("hold" was only ever saved, never created: save_build stores no new build)
        assert [b.id for b in await store.list_builds_page(10)] == ["b9"]
    finally:
        await store.close()


async def test_agents_present_lists_arrivals_and_recent_departures(store: StateStore) -> None:
    arm = AgentPresence("arm", ("linux/arm64",), ("linux/arm/v7",), True, 100.0)
    store.save_presence(arm)
    store.save_presence(AgentPresence("amd", ("linux/amd64",), (), True, 100.0))
    store.save_presence(AgentPresence("amd", ("linux/amd64",), (), False, 150.0))  # left
    store.save_presence(AgentPresence("old", ("linux/s390x",), (), False, 90.0))
    assert await store.agents_present(since=120.0) == [
        AgentPresence("amd", ("linux/amd64",), (), False, 150.0),
        arm,  # present since long before `since`: still expected
    ]
    assert [p.name for p in await store.agents_present(since=200.0)] == ["arm"]

"""What only the PostgreSQL store does: durability across stores, backend failures, reconnects."""

from __future__ import annotations

import asyncio
import gc
import logging

import psycopg
import pytest

from polyarch.coordinator.core.postgres_store import PostgresStore
from polyarch.coordinator.core.store import StoreError
from tests.unit.test_store_contract import make_build


async def test_close_makes_every_queued_write_durable_for_the_next_store(
    postgres_dsn: str,
) -> None:
    first = await PostgresStore.open(postgres_dsn)
    build, jobs = make_build("b1", 1.0, key="k")
    first.create_build(build, jobs)  # never awaited: close still commits it
    await first.close()
    second = await PostgresStore.open(postgres_dsn)
    try:
        assert await second.get_build("b1") == build
        assert await second.jobs_of("b1") == jobs
        assert await second.find_by_idempotency_key("k") == build
    finally:
        await second.close()


async def test_a_backend_failure_is_a_store_error_and_is_logged(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = await PostgresStore.open(postgres_dsn)
    try:
        await store.create_build(*make_build("b1", 1.0))
        store.create_build(*make_build("b1", 1.0))  # the same id again: fails, nobody looks
        again = store.create_build(*make_build("b1", 1.0))
        with pytest.raises(StoreError) as raised:
            await again
        assert not isinstance(raised.value, psycopg.Error)
        assert "builds_pkey" in str(raised.value)
        gc.collect()
        await asyncio.sleep(0)
        assert "never retrieved" not in caplog.text
        assert any(r.levelno == logging.ERROR and "store write failed" in r.message
                   for r in caplog.records)  # fmt: skip
        assert len(await store.jobs_of("b1")) == 2  # the first build is untouched
    finally:
        await store.close()


async def test_a_lost_connection_fails_its_batch_and_the_store_reconnects(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    commits: list[int] = []
    store = await PostgresStore.open(postgres_dsn, observe_batch=commits.append)
    try:
        await store.create_build(*make_build("b1", 1.0))

        async def backend_pid(cur: psycopg.AsyncClientCursor[object]) -> int:
            await cur.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            return int(str(row[0]))

        pid = await store._read(backend_pid)
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as other:
            await other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        lost = store.create_build(*make_build("b2", 2.0))
        with pytest.raises(StoreError):
            await lost
        assert "store write failed" in caplog.text
        await store.create_build(*make_build("b3", 3.0))  # on a new connection
        assert await store._read(backend_pid) != pid
        assert [b.id for b in await store.list_builds_page(10)] == ["b3", "b1"]
        assert commits == [1, 1]  # the lost batch never committed
    finally:
        await store.close()


async def test_every_commit_reports_its_writes_and_its_time_in_the_database(
    postgres_dsn: str,
) -> None:
    latencies: list[float] = []
    sizes: list[int] = []
    commit_times: list[float] = []
    store = await PostgresStore.open(
        postgres_dsn, latencies.append, sizes.append, commit_times.append
    )
    try:
        saving = [store.create_build(*make_build(f"b{i}", float(i))) for i in range(5)]
        await asyncio.gather(*saving)
        await store.save_build(make_build("b1", 1.0)[0])
    finally:
        await store.close()
    assert sizes == [5, 1]  # the five calls made without awaiting shared one commit
    assert len(latencies) == 6 and all(0 < t < 30 for t in latencies)
    assert len(commit_times) == 2 and all(0 < t <= max(latencies) for t in commit_times)


async def test_a_value_postgresql_cannot_hold_fails_only_its_own_write(
    postgres_dsn: str,
) -> None:
    """PostgreSQL text cannot hold NUL (SQLite's can): that write fails, its batch commits."""
    store = await PostgresStore.open(postgres_dsn)
    try:
        build, jobs = make_build("b1", 1.0)
        await store.create_build(build, jobs)
        jobs[0].error = "builder said \x00 mid-line"
        unstorable = store.save_job(jobs[0], "failed", 2.0)
        other = store.create_build(*make_build("b2", 2.0))
        with pytest.raises(StoreError, match="NUL"):
            await unstorable
        await other
        assert (await store.jobs_of("b1"))[0].error == ""
        assert await store.get_build("b2") is not None
    finally:
        await store.close()

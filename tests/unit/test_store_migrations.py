"""Schema versions: PostgreSQL migrations (real server) and SQLite's user_version."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import psycopg
import pytest

from polyarch.coordinator.core.postgres_schema import MIGRATIONS, SCHEMA_VERSION, migrate
from polyarch.coordinator.core.postgres_store import PostgresStore
from polyarch.coordinator.core.sqlite_store import SCHEMA_VERSION as SQLITE_VERSION
from polyarch.coordinator.core.sqlite_store import SQLiteStore
from polyarch.coordinator.core.store import SchemaTooNew
from tests.unit.test_store_contract import make_build


async def versions(dsn: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute("SELECT version FROM schema_version ORDER BY version")
        return [row[0] for row in await cursor.fetchall()]


async def test_a_fresh_database_is_migrated_and_a_second_start_changes_nothing(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    first = await PostgresStore.open(postgres_dsn)
    await first.create_build(*make_build("b1", 1.0))
    await first.close()
    assert await versions(postgres_dsn) == list(range(1, SCHEMA_VERSION + 1))
    assert f"from schema version 0 to {SCHEMA_VERSION}" in caplog.text
    caplog.clear()
    second = await PostgresStore.open(postgres_dsn)
    try:
        assert await second.get_build("b1") is not None  # the data survived the second start
    finally:
        await second.close()
    assert await versions(postgres_dsn) == list(range(1, SCHEMA_VERSION + 1))
    assert "migrated" not in caplog.text


async def test_a_newer_schema_is_refused_naming_both_versions(postgres_dsn: str) -> None:
    await (await PostgresStore.open(postgres_dsn)).close()  # migrated to this version
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 6,)
        )
    with pytest.raises(SchemaTooNew) as refused:
        await PostgresStore.open(postgres_dsn)
    message = str(refused.value)
    assert f"schema version {SCHEMA_VERSION + 6}" in message
    assert f"newer than version {SCHEMA_VERSION} that this polyarch knows" in message
    assert "upgrade polyarch" in message
    assert "postgresql://polyarch_test@127.0.0.1:" in message  # where, without secrets
    # the refusal changed nothing
    assert await versions(postgres_dsn) == [*range(1, SCHEMA_VERSION + 1), SCHEMA_VERSION + 6]


async def test_concurrent_migrations_run_one_after_the_other(postgres_dsn: str) -> None:
    """Step 2 is slow and not repeatable: without the lock, both would run it and one fail."""
    steps = (*MIGRATIONS, "SELECT pg_sleep(0.5); CREATE TABLE only_once (id integer)")
    connections = [
        await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) for _ in range(2)
    ]
    try:
        results = await asyncio.gather(*(migrate(conn, "test", steps) for conn in connections))
    finally:
        for conn in connections:
            await conn.close()
    assert sorted(results) == [(0, len(steps)), (len(steps), len(steps))]
    assert await versions(postgres_dsn) == list(range(1, len(steps) + 1))


async def test_two_coordinators_starting_at_once_both_get_a_migrated_database(
    postgres_dsn: str,
) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(postgres_dsn) for _ in range(3)))
    try:
        await stores[0].create_build(*make_build("b1", 1.0))
        assert await stores[2].get_build("b1") is not None
    finally:
        for store in stores:
            await store.close()
    assert await versions(postgres_dsn) == list(range(1, SCHEMA_VERSION + 1))


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


async def test_sqlite_files_carry_their_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    await SQLiteStore(path).close()
    assert user_version(path) == SQLITE_VERSION
    await SQLiteStore(path).close()  # reopening is fine
    assert user_version(path) == SQLITE_VERSION


async def test_a_sqlite_file_from_a_newer_polyarch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {SQLITE_VERSION + 1}")
    newer.close()
    with pytest.raises(SchemaTooNew) as refused:
        SQLiteStore(path)
    assert str(refused.value) == (
        f"the SQLite database {path} has schema version {SQLITE_VERSION + 1}, newer than "
        f"version {SQLITE_VERSION} that this polyarch knows: upgrade polyarch (a downgrade "
        "cannot read it)"
    )
    assert user_version(path) == SQLITE_VERSION + 1  # untouched

"""The SQLite StateStore: one writer thread, group commit, reads in queue order."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from polyarch.coordinator.core.model import BuildRecord, JobRecord
from polyarch.coordinator.core.presence import AgentPresence
from polyarch.coordinator.core.store import (
    DuplicateIdempotencyKey,
    SchemaTooNew,
    StoreClosed,
    StoreError,
    _log_failed_write,
    _LoopAffinity,
    _settle,
)
from polyarch.coordinator.core.store_rows import (
    BUILD_COLUMNS,
    BUILD_CREATED_AT,
    BUILD_KEY,
    JOB_ATTEMPT,
    JOB_COLUMNS,
    JOB_ID,
    JOB_STATE,
    PRESENT_AGENTS,
    TERMINAL_STATES,
    UPSERT_PRESENCE,
    Row,
    build_from_row,
    build_row,
    job_from_row,
    job_row,
    outcome_row,
    presence_from_row,
    presence_row,
    upsert_assignments,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# PRAGMA user_version of a file this code made: a file with a higher one is refused. Version 1
# is every table and column below; files from before versioning (0) are brought up to it.
SCHEMA_VERSION = 1


_SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    idempotency_key TEXT UNIQUE,
    index_digest TEXT NOT NULL DEFAULT '',
    index_media_type TEXT NOT NULL DEFAULT '',
    index_size INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    owner TEXT NOT NULL DEFAULT '',
    request_hash TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    build_id TEXT NOT NULL REFERENCES builds(id),
    platform TEXT NOT NULL,
    state TEXT NOT NULL,
    agent TEXT NOT NULL DEFAULT '',
    mode TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    digest TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0,
    media_type TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    failed_step TEXT NOT NULL DEFAULT '',
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    requeue_reasons TEXT NOT NULL DEFAULT '[]',
    config_digest TEXT NOT NULL DEFAULT '',
    attestation_digest TEXT NOT NULL DEFAULT '',
    attestation_size INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_build ON jobs(build_id);
CREATE INDEX IF NOT EXISTS builds_by_created ON builds(created_at, id);
CREATE TABLE IF NOT EXISTS job_transitions (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
-- each agent's last arrival or departure (coordinator/core/presence.py)
CREATE TABLE IF NOT EXISTS agent_presence (
    name TEXT PRIMARY KEY,
    native TEXT NOT NULL,
    emulated TEXT NOT NULL,
    present INTEGER NOT NULL,
    at REAL NOT NULL
);
"""


# Columns added after the first release, for databases made before them.
_ADDED_COLUMNS = [
    ("builds", "owner", "TEXT NOT NULL DEFAULT ''"),
    ("builds", "request_hash", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "config_digest", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "attestation_digest", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "attestation_size", "INTEGER NOT NULL DEFAULT 0"),
]

_INSERT_BUILD = f"INSERT INTO builds ({BUILD_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
# A build's request (spec, owner, key, hash, created_at) is written once, by create_build;
# save_build writes what changes, so no state change re-encodes the spec.
_UPDATE_BUILD = (
    "UPDATE builds SET state = ?, finished_at = ?, index_digest = ?, index_media_type = ?, "
    "index_size = ?, error = ? WHERE id = ?"
)
# INSERT ... ON CONFLICT UPDATE: unlike INSERT OR REPLACE it keeps the rowid (and the order).
_UPSERT_JOB = (
    f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({','.join('?' * 19)}) "
    f"ON CONFLICT(id) DO UPDATE SET {upsert_assignments(JOB_COLUMNS)}"
)

_UPSERT_PRESENCE = UPSERT_PRESENCE.replace("%s", "?")
_PRESENT_AGENTS = PRESENT_AGENTS.replace("%s", "?")


def _migrate(db: sqlite3.Connection, path: Path | str) -> None:
    """Creates or completes the schema; refuses a file a newer polyarch wrote."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(f"the SQLite database {path}", found, SCHEMA_VERSION)
    db.executescript(_SCHEMA)
    for table, column, kind in _ADDED_COLUMNS:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    if found < SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _write_job(db: sqlite3.Connection, row: Row, reason: str, at: float) -> None:
    """Upserts a job row; appends a transition when (state, attempt) changed."""
    job_id, state, attempt = row[JOB_ID], row[JOB_STATE], row[JOB_ATTEMPT]
    previous = db.execute("SELECT state, attempt FROM jobs WHERE id = ?", (job_id,)).fetchone()
    db.execute(_UPSERT_JOB, row)
    if previous is None or tuple(previous) != (state, attempt):
        db.execute(
            "INSERT INTO job_transitions (job_id, attempt, state, reason, at) VALUES (?,?,?,?,?)",
            (job_id, attempt, state, reason, at),
        )


def _insert_build(db: sqlite3.Connection, build: Row, jobs: list[Row]) -> None:
    try:
        db.execute(_INSERT_BUILD, build)
    except sqlite3.IntegrityError:
        key = build[BUILD_KEY]
        row = db.execute("SELECT id FROM builds WHERE idempotency_key = ?", (key,)).fetchone()
        if key is None or row is None:
            raise
        raise DuplicateIdempotencyKey(row[0]) from None
    for job in jobs:
        _write_job(db, job, "submitted", build[BUILD_CREATED_AT])


@dataclass(slots=True)
class _Op:
    """One queued call: a write (in its own savepoint), a read, or the writer's stop."""

    kind: str  # "write" | "read" | "stop"
    run: Callable[[sqlite3.Connection], object]
    future: asyncio.Future[Any]
    queued_at: float


def _nothing(db: sqlite3.Connection) -> None:
    return None


_MAX_BATCH = 1024  # bounds how long one commit keeps the earliest write waiting


class SQLiteStore(_LoopAffinity):
    """StateStore in one SQLite file (WAL, synchronous=FULL: a commit survives power loss).

    One writer thread owns the connection. It takes everything queued (up to _MAX_BATCH
    calls), applies the writes in one transaction, each in its own savepoint so one failure
    fails only that write, runs the reads in between in queue order (they see the writes
    before them), commits once, then settles the batch's futures with one loop callback.
    A read's answer is released only with its batch, after the commit: nobody sees state
    that is not durable. If the commit fails, every call in the batch fails with StoreError.

    observe_write(seconds) gets each write's time from its call to its commit, observe_batch(n)
    each commit's write count, observe_commit(seconds) each batch's time in the database; all
    run on the writer thread.
    """

    def __init__(
        self,
        path: Path | str,
        observe_write: Callable[[float], None] | None = None,
        observe_batch: Callable[[int], None] | None = None,
        observe_commit: Callable[[float], None] | None = None,
    ) -> None:
        # Opened here (so a bad path fails the constructor), used only by the writer after.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            _migrate(self._db, path)
        except BaseException:
            self._db.close()
            raise
        self._observe_write = observe_write
        self._observe_batch = observe_batch
        self._observe_commit = observe_commit
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._closing: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, name="polyarch-store", daemon=True)
        self._thread.start()

    # ---- writes -------------------------------------------------------------
    def create_build(self, build: BuildRecord, jobs: list[JobRecord]) -> asyncio.Future[None]:
        row, job_rows = build_row(build), [job_row(j) for j in jobs]
        return self._write(lambda db: _insert_build(db, row, job_rows))

    def save_build(self, build: BuildRecord) -> asyncio.Future[None]:
        row = outcome_row(build)
        return self._write(lambda db: db.execute(_UPDATE_BUILD, row))

    def save_job(self, job: JobRecord, reason: str = "", at: float = 0.0) -> asyncio.Future[None]:
        row = job_row(job)
        return self._write(lambda db: _write_job(db, row, reason, at))

    # ---- reads --------------------------------------------------------------
    async def get_build(self, build_id: str) -> BuildRecord | None:
        sql = f"SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?"
        return await self._read(lambda db: _one_build(db.execute(sql, (build_id,))))

    async def find_by_idempotency_key(self, key: str) -> BuildRecord | None:
        sql = f"SELECT {BUILD_COLUMNS} FROM builds WHERE idempotency_key = ?"  # "" is NULL
        return await self._read(lambda db: _one_build(db.execute(sql, (key,))))

    async def jobs_of(self, build_id: str) -> list[JobRecord]:
        return (await self.jobs_of_many([build_id]))[build_id]

    async def jobs_of_many(self, build_ids: list[str]) -> dict[str, list[JobRecord]]:
        ids = list(dict.fromkeys(build_ids))
        # one statement whatever the count: the ids travel as one JSON array
        sql = (
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE build_id IN "
            "(SELECT value FROM json_each(?)) ORDER BY rowid"
        )

        def query(db: sqlite3.Connection) -> dict[str, list[JobRecord]]:
            found: dict[str, list[JobRecord]] = {build_id: [] for build_id in ids}
            for row in db.execute(sql, (json.dumps(ids),)):
                found[row[1]].append(job_from_row(row))
            return found

        return await self._read(query)

    async def list_builds_page(
        self, limit: int, before: tuple[float, str] | None = None
    ) -> list[BuildRecord]:
        where, args = ("WHERE (created_at, id) < (?, ?)", before) if before else ("", ())
        sql = (
            f"SELECT {BUILD_COLUMNS} FROM builds {where} ORDER BY created_at DESC, id DESC LIMIT ?"
        )
        return await self._read(lambda db: _all_builds(db.execute(sql, (*args, limit))))

    async def unfinished_builds(self) -> list[BuildRecord]:
        terminal = TERMINAL_STATES
        marks = ",".join("?" * len(terminal))
        sql = (
            f"SELECT {BUILD_COLUMNS} FROM builds WHERE state NOT IN ({marks}) "
            "ORDER BY created_at, rowid"
        )
        return await self._read(lambda db: _all_builds(db.execute(sql, terminal)))

    async def transitions(self, job_id: str) -> list[tuple[int, str, str]]:
        sql = "SELECT attempt, state, reason FROM job_transitions WHERE job_id = ? ORDER BY rowid"
        return await self._read(
            lambda db: [(int(a), str(s), str(r)) for a, s, r in db.execute(sql, (job_id,))]
        )

    def save_presence(self, presence: AgentPresence) -> asyncio.Future[None]:
        row = presence_row(presence)
        return self._write(lambda db: db.execute(_UPSERT_PRESENCE, row))

    async def agents_present(self, since: float) -> list[AgentPresence]:
        return await self._read(
            lambda db: [presence_from_row(r) for r in db.execute(_PRESENT_AGENTS, (since,))]
        )

    # ---- lifecycle ----------------------------------------------------------
    async def flush(self) -> None:
        await self._read(_nothing)  # settles with the batch holding every earlier write

    async def close(self) -> None:
        """Flushes, stops the writer thread and closes the file. Idempotent."""
        loop = self._bind()
        if self._closing is None:
            self._closing = loop.create_future()
            self._queue.put(_Op("stop", _nothing, self._closing, time.perf_counter()))
        await asyncio.shield(self._closing)
        await asyncio.to_thread(self._thread.join)

    # ---- the queue ----------------------------------------------------------
    def _write(self, run: Callable[[sqlite3.Connection], object]) -> asyncio.Future[None]:
        loop = self._bind()
        future: asyncio.Future[None] = loop.create_future()
        if self._closing is not None:
            error = StoreClosed("write after the store was closed")
            _log_failed_write(error)
            _settle(future, None, error)
        else:
            self._queue.put(_Op("write", run, future, time.perf_counter()))
        return future

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        loop = self._bind()
        if self._closing is not None:
            raise StoreClosed("read after the store was closed")
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Op("read", run, future, time.perf_counter()))
        return await future

    # ---- the writer thread --------------------------------------------------
    def _run(self) -> None:
        stopped = False
        while not stopped:
            batch = [self._queue.get()]
            while len(batch) < _MAX_BATCH and batch[-1].kind != "stop":
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            applying_at = time.perf_counter()
            outcomes, writes = self._apply(batch)
            durable_at = time.perf_counter()
            if batch[-1].kind == "stop":
                stopped = True
                try:
                    self._db.close()
                except sqlite3.Error:
                    log.exception("store: closing the database failed")
            self._observe(
                batch, writes, applying_at, durable_at
            )  # first: a settled write is counted
            self._deliver(outcomes)

    def _apply(
        self, batch: list[_Op]
    ) -> tuple[list[tuple[_Op, object, BaseException | None]], int]:
        """Runs one batch in one transaction; returns each call's outcome and the write count."""
        outcomes: list[tuple[_Op, object, BaseException | None]] = []
        db, writes = self._db, 0
        try:
            for op in batch:
                if op.kind == "write":
                    if not db.in_transaction:
                        db.execute("BEGIN IMMEDIATE")
                    writes += 1
                    db.execute("SAVEPOINT write")
                    try:
                        op.run(db)
                    except Exception as error:  # fails this write only
                        db.execute("ROLLBACK TO write")
                        outcomes.append((op, None, _neutral(error)))
                    else:
                        outcomes.append((op, None, None))
                    db.execute("RELEASE write")
                else:
                    try:
                        outcomes.append((op, op.run(db), None))
                    except Exception as error:  # fails this read only
                        outcomes.append((op, None, _neutral(error)))
            if db.in_transaction:
                db.execute("COMMIT")
        except Exception as error:  # the commit (or the connection) failed
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("store: rollback failed")
            writes = 0  # nothing committed: nothing to observe
            failure = StoreError(f"commit failed: {error}")
            failure.__cause__ = error
            outcomes = [(op, None, failure) for op in batch if op.kind != "stop"]
            outcomes += [(op, None, None) for op in batch if op.kind == "stop"]
        return outcomes, writes

    def _deliver(self, outcomes: list[tuple[_Op, object, BaseException | None]]) -> None:
        for op, _, error in outcomes:
            if error is not None and op.kind == "write":
                _log_failed_write(error)
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_settle_all, outcomes)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            log.warning("store: event loop closed before %d calls were settled", len(outcomes))

    def _observe(
        self, batch: list[_Op], writes: int, applying_at: float, durable_at: float
    ) -> None:
        if not writes:
            return
        try:
            if self._observe_commit is not None:
                self._observe_commit(durable_at - applying_at)
            if self._observe_batch is not None:
                self._observe_batch(writes)
            if self._observe_write is not None:
                for op in batch:
                    if op.kind == "write":
                        self._observe_write(durable_at - op.queued_at)
        except Exception:  # a broken metric must not stop the writer
            log.exception("store: an observe hook failed")


def _settle_all(outcomes: list[tuple[_Op, object, BaseException | None]]) -> None:
    for op, value, error in outcomes:
        _settle(op.future, value, error)


def _neutral(error: Exception) -> Exception:
    """Backend errors become StoreError, so no sqlite3 type reaches a caller."""
    if isinstance(error, sqlite3.Error):
        neutral = StoreError(str(error))
        neutral.__cause__ = error
        return neutral
    return error


def _one_build(cursor: sqlite3.Cursor) -> BuildRecord | None:
    row = cursor.fetchone()
    return None if row is None else build_from_row(row)


def _all_builds(cursor: sqlite3.Cursor) -> list[BuildRecord]:
    return [build_from_row(row) for row in cursor]

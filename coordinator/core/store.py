"""Durable build and job state: the StateStore contract and its SQLite and memory backends."""

from __future__ import annotations

import copy
import json
import sqlite3
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from polyarch.coordinator.core.model import (
    BuildRecord,
    BuildSpec,
    BuildState,
    EmulationPolicy,
    JobRecord,
    JobState,
    Mode,
)


class DuplicateIdempotencyKey(Exception):
    """create_build was given an idempotency key another build already holds."""

    def __init__(self, build_id: str) -> None:
        super().__init__(f"idempotency key already used by build {build_id}")
        self.build_id = build_id


class StateStore(Protocol):
    """Where builds and jobs live. Every method is durable when it returns.

    Contract (tests/unit/test_store_contract.py runs it against every backend):
    - create_build stores a build and its jobs atomically; a second build with the
      same non-empty idempotency key raises DuplicateIdempotencyKey naming the first.
    - save_build / save_job overwrite the stored record; save_job also appends a
      transition (job id, attempt, state, reason, time) when the state changed.
    - Reads return copies: mutating them changes nothing until saved.
    - list_builds is newest first; unfinished_builds is oldest first.
    - list_builds_page orders by (created_at, id), newest first, and returns up to `limit`
      builds strictly after the cursor `before` (a (created_at, id) pair; None: the newest),
      so pages never repeat or skip a build, even among builds created at the same time.
    """

    def create_build(self, build: BuildRecord, jobs: list[JobRecord]) -> None: ...
    def save_build(self, build: BuildRecord) -> None: ...
    def save_job(self, job: JobRecord, reason: str = "", at: float = 0.0) -> None: ...
    def get_build(self, build_id: str) -> BuildRecord | None: ...
    def find_by_idempotency_key(self, key: str) -> BuildRecord | None: ...
    def jobs_of(self, build_id: str) -> list[JobRecord]: ...
    def list_builds(self, limit: int) -> list[BuildRecord]: ...
    def list_builds_page(
        self, limit: int, before: tuple[float, str] | None = None
    ) -> list[BuildRecord]: ...
    def unfinished_builds(self) -> list[BuildRecord]: ...
    def transitions(self, job_id: str) -> list[tuple[int, str, str]]: ...
    def close(self) -> None: ...


def _spec_to_json(spec: BuildSpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True)


def _spec_from_json(text: str) -> BuildSpec:
    data: dict[str, Any] = json.loads(text)
    data["emulation"] = EmulationPolicy(data["emulation"])
    return BuildSpec(**data)


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
    requeue_reasons TEXT NOT NULL DEFAULT '[]'
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
"""


def _upsert(table: str, columns: str) -> str:
    """INSERT ... ON CONFLICT UPDATE: unlike INSERT OR REPLACE it keeps the rowid (and order)."""
    names = [c.strip() for c in columns.split(",")]
    updates = ", ".join(f"{n} = excluded.{n}" for n in names[1:])
    marks = ",".join("?" * len(names))
    return (
        f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT(id) DO UPDATE SET {updates}"
    )


_BUILD_COLUMNS = (
    "id, state, spec, created_at, finished_at, idempotency_key, "
    "index_digest, index_media_type, index_size, error, owner, request_hash"
)
# Columns added after the first release, for databases made before them.
_ADDED_COLUMNS = [
    ("builds", "owner", "TEXT NOT NULL DEFAULT ''"),
    ("builds", "request_hash", "TEXT NOT NULL DEFAULT ''"),
]
_JOB_COLUMNS = (
    "id, build_id, platform, state, agent, mode, attempt, digest, size, media_type, "
    "error, failed_step, queued_at, started_at, finished_at, requeue_reasons"
)
_UPSERT_BUILD = _upsert("builds", _BUILD_COLUMNS)
_UPSERT_JOB = _upsert("jobs", _JOB_COLUMNS)


class SQLiteStore:
    """StateStore in one SQLite file (WAL, synchronous=FULL: a commit survives power loss)."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        for table, column, kind in _ADDED_COLUMNS:
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def create_build(self, build: BuildRecord, jobs: list[JobRecord]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    f"INSERT INTO builds ({_BUILD_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    self._build_row(build),
                )
                for job in jobs:
                    self._write_job(job, "submitted", build.created_at)
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                row = self._db.execute(
                    "SELECT id FROM builds WHERE idempotency_key = ?", (build.idempotency_key,)
                ).fetchone()
                if row is None:
                    raise
                raise DuplicateIdempotencyKey(row[0]) from None

    def save_build(self, build: BuildRecord) -> None:
        with self._lock:
            self._db.execute(_UPSERT_BUILD, self._build_row(build))

    def save_job(self, job: JobRecord, reason: str = "", at: float = 0.0) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._write_job(job, reason, at)
            self._db.execute("COMMIT")

    def get_build(self, build_id: str) -> BuildRecord | None:
        row = self._query_one(f"SELECT {_BUILD_COLUMNS} FROM builds WHERE id = ?", (build_id,))
        return None if row is None else self._build_from_row(row)

    def find_by_idempotency_key(self, key: str) -> BuildRecord | None:
        row = self._query_one(
            f"SELECT {_BUILD_COLUMNS} FROM builds WHERE idempotency_key = ?", (key,)
        )
        return None if row is None else self._build_from_row(row)

    def jobs_of(self, build_id: str) -> list[JobRecord]:
        rows = self._query(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE build_id = ? ORDER BY rowid", (build_id,)
        )
        return [self._job_from_row(r) for r in rows]

    def list_builds(self, limit: int) -> list[BuildRecord]:
        rows = self._query(
            f"SELECT {_BUILD_COLUMNS} FROM builds ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (limit,),
        )
        return [self._build_from_row(r) for r in rows]

    def list_builds_page(
        self, limit: int, before: tuple[float, str] | None = None
    ) -> list[BuildRecord]:
        where, args = ("WHERE (created_at, id) < (?, ?)", before) if before else ("", ())
        rows = self._query(
            f"SELECT {_BUILD_COLUMNS} FROM builds {where} ORDER BY created_at DESC, id DESC "
            "LIMIT ?",
            (*args, limit),
        )
        return [self._build_from_row(r) for r in rows]

    def unfinished_builds(self) -> list[BuildRecord]:
        terminal = tuple(s.value for s in BuildState if s.terminal)
        rows = self._query(
            f"SELECT {_BUILD_COLUMNS} FROM builds WHERE state NOT IN (?,?,?) "
            "ORDER BY created_at, rowid",
            terminal,
        )
        return [self._build_from_row(r) for r in rows]

    def transitions(self, job_id: str) -> list[tuple[int, str, str]]:
        rows = self._query(
            "SELECT attempt, state, reason FROM job_transitions WHERE job_id = ? ORDER BY rowid",
            (job_id,),
        )
        return [(int(a), str(s), str(r)) for a, s, r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- rows ---------------------------------------------------------------
    def _query(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def _query_one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        rows = self._query(sql, args)
        return rows[0] if rows else None

    def _write_job(self, job: JobRecord, reason: str, at: float) -> None:
        previous = self._db.execute(
            "SELECT state, attempt FROM jobs WHERE id = ?", (job.id,)
        ).fetchone()
        self._db.execute(
            _UPSERT_JOB,
            (
                job.id, job.build_id, job.platform, job.state.value, job.agent,
                job.mode.value if job.mode else None, job.attempt, job.digest, job.size,
                job.media_type, job.error, job.failed_step, job.queued_at, job.started_at,
                job.finished_at, json.dumps(job.requeue_reasons),
            ),
        )  # fmt: skip
        if previous is None or tuple(previous) != (job.state.value, job.attempt):
            self._db.execute(
                "INSERT INTO job_transitions (job_id, attempt, state, reason, at) "
                "VALUES (?,?,?,?,?)",
                (job.id, job.attempt, job.state.value, reason, at),
            )

    @staticmethod
    def _build_row(build: BuildRecord) -> tuple[Any, ...]:
        return (
            build.id, build.state.value, _spec_to_json(build.spec), build.created_at,
            build.finished_at, build.idempotency_key or None, build.index_digest,
            build.index_media_type, build.index_size, build.error, build.owner,
            build.request_hash,
        )  # fmt: skip

    @staticmethod
    def _build_from_row(row: tuple[Any, ...]) -> BuildRecord:
        return BuildRecord(
            id=row[0], state=BuildState(row[1]), spec=_spec_from_json(row[2]),
            created_at=row[3], finished_at=row[4], idempotency_key=row[5] or "",
            index_digest=row[6], index_media_type=row[7], index_size=row[8], error=row[9],
            owner=row[10], request_hash=row[11],
        )  # fmt: skip

    @staticmethod
    def _job_from_row(row: tuple[Any, ...]) -> JobRecord:
        return JobRecord(
            id=row[0], build_id=row[1], platform=row[2], state=JobState(row[3]), agent=row[4],
            mode=Mode(row[5]) if row[5] else None, attempt=row[6], digest=row[7], size=row[8],
            media_type=row[9], error=row[10], failed_step=row[11], queued_at=row[12],
            started_at=row[13], finished_at=row[14], requeue_reasons=json.loads(row[15]),
        )  # fmt: skip


class MemoryStore:
    """StateStore in memory, for scheduling simulations; same contract, nothing durable."""

    def __init__(self) -> None:
        self._builds: dict[str, BuildRecord] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._transitions: dict[str, list[tuple[int, str, str]]] = {}

    def create_build(self, build: BuildRecord, jobs: list[JobRecord]) -> None:
        if build.idempotency_key:
            existing = self.find_by_idempotency_key(build.idempotency_key)
            if existing is not None:
                raise DuplicateIdempotencyKey(existing.id)
        self._builds[build.id] = copy.deepcopy(build)
        for job in jobs:
            self.save_job(job, "submitted")

    def save_build(self, build: BuildRecord) -> None:
        self._builds[build.id] = copy.deepcopy(build)

    def save_job(self, job: JobRecord, reason: str = "", at: float = 0.0) -> None:
        previous = self._jobs.get(job.id)
        if previous is None or (previous.state, previous.attempt) != (job.state, job.attempt):
            self._transitions.setdefault(job.id, []).append((job.attempt, job.state.value, reason))
        self._jobs[job.id] = copy.deepcopy(job)

    def get_build(self, build_id: str) -> BuildRecord | None:
        build = self._builds.get(build_id)
        return copy.deepcopy(build) if build else None

    def find_by_idempotency_key(self, key: str) -> BuildRecord | None:
        for build in self._builds.values():
            if key and build.idempotency_key == key:
                return copy.deepcopy(build)
        return None

    def jobs_of(self, build_id: str) -> list[JobRecord]:
        return [copy.deepcopy(j) for j in self._jobs.values() if j.build_id == build_id]

    def list_builds(self, limit: int) -> list[BuildRecord]:
        ordered = sorted(enumerate(self._builds.values()), key=lambda p: (p[1].created_at, p[0]))
        return [copy.deepcopy(b) for _, b in reversed(ordered)][:limit]

    def list_builds_page(
        self, limit: int, before: tuple[float, str] | None = None
    ) -> list[BuildRecord]:
        ordered = sorted(self._builds.values(), key=lambda b: (b.created_at, b.id), reverse=True)
        after = [b for b in ordered if before is None or (b.created_at, b.id) < before]
        return [copy.deepcopy(b) for b in after[:limit]]

    def unfinished_builds(self) -> list[BuildRecord]:
        ordered = sorted(self._builds.values(), key=lambda b: b.created_at)
        return [copy.deepcopy(b) for b in ordered if not b.state.terminal]

    def transitions(self, job_id: str) -> list[tuple[int, str, str]]:
        return list(self._transitions.get(job_id, []))

    def close(self) -> None:
        pass

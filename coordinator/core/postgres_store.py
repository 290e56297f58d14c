"""The PostgreSQL StateStore: one writer task on one connection, group commit, reads after it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncClientCursor, AsyncConnection, errors, pq

from polyarch.coordinator.core.model import BuildRecord, JobRecord
from polyarch.coordinator.core.postgres_schema import migrate
from polyarch.coordinator.core.presence import AgentPresence
from polyarch.coordinator.core.store import (
    DuplicateIdempotencyKey,
    Fenced,
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
from polyarch.coordinator.database_address import redacted_dsn

log = logging.getLogger(__name__)

T = TypeVar("T")
Cursor = AsyncClientCursor[Any]
Statement = tuple[str, Row]

_INSERT_BUILD = f"INSERT INTO builds ({BUILD_COLUMNS}) VALUES ({', '.join(['%s'] * 12)})"
_UPDATE_BUILD = (
    "UPDATE builds SET state = %s, finished_at = %s, index_digest = %s, index_media_type = %s, "
    "index_size = %s, error = %s WHERE id = %s"
)
# One statement: the row as it was (`previous`, the statement's snapshot), the upsert, and a
# transition unless (state, attempt) stayed the same.
_WRITE_JOB = (
    "WITH previous AS (SELECT state, attempt FROM jobs WHERE id = %s), "
    f"written AS (INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join(['%s'] * 19)}) "
    f"ON CONFLICT (id) DO UPDATE SET {upsert_assignments(JOB_COLUMNS)}) "
    "INSERT INTO job_transitions (job_id, attempt, state, reason, at) "
    "SELECT %s, %s, %s, %s, %s WHERE NOT EXISTS "
    "(SELECT 1 FROM previous WHERE state = %s AND attempt = %s)"
)
_MAX_BATCH = 1024  # bounds how long one commit keeps the earliest write waiting


def _job_statement(row: Row, reason: str, at: float) -> Statement:
    job_id, state, attempt = row[JOB_ID], row[JOB_STATE], row[JOB_ATTEMPT]
    return _WRITE_JOB, (job_id, *row, job_id, attempt, state, reason, at, state, attempt)


@dataclass(slots=True)
class _Op:
    """One queued call: a write (statements, one savepoint), a read, or the writer's stop."""

    kind: str  # "write" | "read" | "stop"
    future: asyncio.Future[Any]
    statements: list[Statement] = field(default_factory=list)
    read: Callable[[Cursor], Awaitable[Any]] | None = None
    idempotency_key: str | None = None
    queued_at: float = field(default_factory=time.perf_counter)


class PostgresStore(_LoopAffinity):
    """StateStore in a PostgreSQL database (`await PostgresStore.open(dsn)`).

    A writer task owns one connection. It takes everything queued (up to _MAX_BATCH calls) and
    sends the writes and their commit in one round trip; if one write fails, it applies them
    again one by one, each in its own savepoint, so only that write fails. Then it runs the
    batch's reads (they see every write queued before them, and nothing uncommitted) and
    settles the futures. If the transaction fails, every call in the batch fails with
    StoreError; a lost connection is opened again for the next batch.

    observe_write(seconds) gets each write's time from its call to its commit, observe_batch(n)
    each commit's write count, observe_commit(seconds) each transaction's time in the database.
    """

    def __init__(self, dsn: str, observe_write: Callable[[float], None] | None = None,
                 observe_batch: Callable[[int], None] | None = None,
                 observe_commit: Callable[[float], None] | None = None) -> None:  # fmt: skip
        """Use open(); the constructor connects nothing."""
        self._dsn, self._where = dsn, f"the PostgreSQL database {redacted_dsn(dsn)}"
        self._observe_write, self._observe_batch = observe_write, observe_batch
        self._observe_commit = observe_commit
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._conn: AsyncConnection[Any] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        # The term this coordinator was elected for (coordinator/ha/election.py): when set,
        # every transaction first checks that it is still the current one, holding the term
        # row FOR SHARE, so a takeover's epoch increment waits for commits in flight and
        # every later commit of this store fails with Fenced. None: no election (one
        # coordinator on its own database).
        self.fence_epoch: int | None = None
        # Told once a commit was fenced, so the coordinator stops at once (coordinator/ha).
        self.on_fenced: Callable[[], None] | None = None

    @classmethod
    async def open(
        cls,
        dsn: str,
        observe_write: Callable[[float], None] | None = None,
        observe_batch: Callable[[int], None] | None = None,
        observe_commit: Callable[[float], None] | None = None,
    ) -> PostgresStore:
        """Connects, migrates (refusing a newer schema) and starts the writer."""
        store = cls(dsn, observe_write, observe_batch, observe_commit)
        store._bind()
        store._conn = await store._connect()
        store._writer = asyncio.create_task(store._run(), name="polyarch-store")
        return store

    async def _connect(self) -> AsyncConnection[Any]:
        """A migrated connection. (Leader election will take its advisory lock here.)"""
        try:
            conn = await AsyncConnection.connect(
                self._dsn, autocommit=True, cursor_factory=AsyncClientCursor,
                application_name="polyarch-coordinator",
            )  # fmt: skip
        except psycopg.Error as error:  # libpq's message names host and user, never a password
            raise StoreError(f"cannot connect to {self._where}: {error}") from error
        try:
            found, now = await migrate(conn, self._where)
        except BaseException:
            await conn.close()
            raise
        if found != now:
            log.info("store: migrated %s from schema version %d to %d", self._where, found, now)
        return conn

    # ---- writes -------------------------------------------------------------
    def create_build(self, build: BuildRecord, jobs: list[JobRecord]) -> asyncio.Future[None]:
        row = build_row(build)
        statements = [(_INSERT_BUILD, row)]
        statements += [_job_statement(job_row(j), "submitted", row[BUILD_CREATED_AT]) for j in jobs]
        return self._write(statements, idempotency_key=row[BUILD_KEY])

    def save_build(self, build: BuildRecord) -> asyncio.Future[None]:
        return self._write([(_UPDATE_BUILD, outcome_row(build))])

    def save_job(self, job: JobRecord, reason: str = "", at: float = 0.0) -> asyncio.Future[None]:
        return self._write([_job_statement(job_row(job), reason, at)])

    # ---- reads --------------------------------------------------------------
    async def get_build(self, build_id: str) -> BuildRecord | None:
        sql = f"SELECT {BUILD_COLUMNS} FROM builds WHERE id = %s"
        return await self._read(lambda cur: _one_build(cur, sql, (build_id,)))

    async def find_by_idempotency_key(self, key: str) -> BuildRecord | None:
        sql = f"SELECT {BUILD_COLUMNS} FROM builds WHERE idempotency_key = %s"  # "" is NULL
        return await self._read(lambda cur: _one_build(cur, sql, (key,)))

    async def jobs_of(self, build_id: str) -> list[JobRecord]:
        return (await self.jobs_of_many([build_id]))[build_id]

    async def jobs_of_many(self, build_ids: list[str]) -> dict[str, list[JobRecord]]:
        ids = list(dict.fromkeys(build_ids))
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE build_id = ANY(%s) ORDER BY seq"

        async def query(cur: Cursor) -> dict[str, list[JobRecord]]:
            found: dict[str, list[JobRecord]] = {build_id: [] for build_id in ids}
            await cur.execute(sql, (ids,))
            for row in await cur.fetchall():
                found[row[1]].append(job_from_row(row))
            return found

        return await self._read(query)

    async def list_builds_page(
        self, limit: int, before: tuple[float, str] | None = None
    ) -> list[BuildRecord]:
        where, args = ("WHERE (created_at, id) < (%s, %s)", before) if before else ("", ())
        sql = (
            f"SELECT {BUILD_COLUMNS} FROM builds {where} ORDER BY created_at DESC, id DESC LIMIT %s"
        )
        return await self._read(lambda cur: _all_builds(cur, sql, (*args, limit)))

    async def unfinished_builds(self) -> list[BuildRecord]:
        sql = (
            f"SELECT {BUILD_COLUMNS} FROM builds WHERE state NOT IN "
            f"({', '.join(['%s'] * len(TERMINAL_STATES))}) ORDER BY created_at, seq"
        )
        return await self._read(lambda cur: _all_builds(cur, sql, TERMINAL_STATES))

    def save_presence(self, presence: AgentPresence) -> asyncio.Future[None]:
        return self._write([(UPSERT_PRESENCE, presence_row(presence))])

    async def agents_present(self, since: float) -> list[AgentPresence]:
        async def query(cur: Cursor) -> list[AgentPresence]:
            await cur.execute(PRESENT_AGENTS, (since,))
            return [presence_from_row(row) for row in await cur.fetchall()]

        return await self._read(query)

    async def transitions(self, job_id: str) -> list[tuple[int, str, str]]:
        sql = "SELECT attempt, state, reason FROM job_transitions WHERE job_id = %s ORDER BY seq"

        async def query(cur: Cursor) -> list[tuple[int, str, str]]:
            await cur.execute(sql, (job_id,))
            return [(int(a), str(s), str(r)) for a, s, r in await cur.fetchall()]

        return await self._read(query)

    # ---- lifecycle ----------------------------------------------------------
    async def flush(self) -> None:
        await self._read(_nothing)  # settles with the batch holding every earlier write

    async def close(self) -> None:
        """Flushes, stops the writer and closes the connection. Idempotent."""
        loop = self._bind()
        if self._closing is None:
            self._closing = loop.create_future()
            self._queue.put_nowait(_Op("stop", self._closing))
        await asyncio.shield(self._closing)
        if self._writer is not None:
            await asyncio.shield(self._writer)

    # ---- the queue ----------------------------------------------------------
    def _write(
        self, statements: list[Statement], idempotency_key: str | None = None
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self._bind().create_future()
        if self._closing is not None:
            error = StoreClosed("write after the store was closed")
            _log_failed_write(error)
            _settle(future, None, error)
        else:
            self._queue.put_nowait(_Op("write", future, statements, None, idempotency_key))
        return future

    async def _read(self, run: Callable[[Cursor], Awaitable[T]]) -> T:
        loop = self._bind()
        if self._closing is not None:
            raise StoreClosed("read after the store was closed")
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put_nowait(_Op("read", future, read=run))
        return await future

    # ---- the writer task ----------------------------------------------------
    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _MAX_BATCH and batch[-1].kind != "stop" and self._queue.qsize():
                batch.append(self._queue.get_nowait())
            outcomes = await self._apply(batch)
            if batch[-1].kind == "stop":
                await self._disconnect()
            for op, value, error in outcomes:
                if error is not None and op.kind == "write":
                    _log_failed_write(error)
                _settle(op.future, value, error)
            if batch[-1].kind == "stop":
                return

    async def _apply(self, batch: list[_Op]) -> list[tuple[_Op, object, BaseException | None]]:
        """The batch's writes in one transaction, then its reads; each call's outcome."""
        writes = [op for op in batch if op.kind == "write"]
        outcomes: list[tuple[_Op, object, BaseException | None]] = []
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await self._connect()
            cur = AsyncClientCursor(self._conn)  # client-side binding: see _write_all
            if writes:
                began = time.perf_counter()
                outcomes += await self._write_all(cur, writes)
                self._observe(writes, began)
        except Exception as error:  # the transaction (or the connection) failed
            await self._recover(error)
            if isinstance(error, psycopg.Error) and error.sqlstate == _FENCED:
                error = Fenced(self.fence_epoch or 0)
                if self.on_fenced is not None:
                    self.on_fenced()
            failure = error if isinstance(error, StoreError) else _neutral(error, "commit failed: ")
            return [(op, None, failure) for op in batch if op.kind != "stop"] + [
                (op, None, None) for op in batch if op.kind == "stop"
            ]
        for op in batch:
            if op.kind == "read" and op.read is not None:
                outcomes.append(await self._read_one(cur, op.read, op))
            elif op.kind == "stop":
                outcomes.append((op, None, None))
        return outcomes

    async def _write_all(
        self, cur: Cursor, writes: list[_Op]
    ) -> list[tuple[_Op, object, BaseException | None]]:
        """Every write and the commit in one round trip: the statements are bound client-side
        into one string (the simple query protocol takes many statements, without parameters).
        If one write fails, nothing is applied, and the writes go again one by one, each in its
        savepoint, so only that one fails."""
        bodies: list[tuple[_Op, str]] = []
        unbindable: list[tuple[_Op, object, BaseException | None]] = []
        for op in writes:
            try:
                bodies.append((op, "; ".join(cur.mogrify(sql, a) for sql, a in op.statements)))
            except psycopg.DataError as error:  # a NUL in a string, say: fails this write only
                unbindable.append((op, None, _neutral(error)))
        if not bodies:
            return unbindable
        try:
            await cur.execute(
                f"BEGIN; {self._fence()}{'; '.join(body for _, body in bodies)}; COMMIT"
            )
            return [(op, None, None) for op, _ in bodies] + unbindable
        except (errors.IntegrityError, errors.DataError):
            await cur.execute("ROLLBACK")  # the string stopped at the error, before its COMMIT
        outcomes = unbindable
        for i, (op, body) in enumerate(bodies):
            begin = f"BEGIN; {self._fence()}" if i == 0 else ""
            outcomes.append((op, None, await self._write_one(cur, op, body, begin)))
        await cur.execute("COMMIT")
        return outcomes

    def _fence(self) -> str:
        return "" if self.fence_epoch is None else _fence_check(self.fence_epoch)

    async def _write_one(self, cur: Cursor, op: _Op, body: str, begin: str) -> BaseException | None:
        """One write in its savepoint, in one round trip (`begin` opens the transaction)."""
        try:
            await cur.execute(f"{begin}SAVEPOINT w; {body}; RELEASE SAVEPOINT w")
        except (errors.IntegrityError, errors.DataError) as error:  # fails this write only
            await cur.execute("ROLLBACK TO SAVEPOINT w; RELEASE SAVEPOINT w")
            if (
                isinstance(error, errors.UniqueViolation)
                and op.idempotency_key is not None
                and (error.diag.constraint_name == "builds_idempotency_key")
            ):
                await cur.execute("SELECT id FROM builds WHERE idempotency_key = %s",
                                  (op.idempotency_key,))  # fmt: skip
                first = await cur.fetchone()
                if first is not None:
                    return DuplicateIdempotencyKey(str(first[0]))
            return _neutral(error)
        return None

    async def _read_one(
        self, cur: Cursor, run: Callable[[Cursor], Awaitable[Any]], op: _Op
    ) -> tuple[_Op, object, BaseException | None]:
        try:
            return op, await run(cur), None
        except Exception as error:  # fails this read only (autocommit: nothing to roll back)
            await self._recover(error)
            return op, None, _neutral(error)

    async def _recover(self, error: Exception) -> None:
        """After a failure: roll back an open transaction, or drop a broken connection."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        if conn.info.transaction_status == pq.TransactionStatus.IDLE and not conn.broken:
            return  # a read failed in autocommit: nothing to undo
        if isinstance(error, psycopg.OperationalError) and conn.broken:
            self._conn = None
            await conn.close()
            return
        try:
            await conn.execute("ROLLBACK")  # a warning, no error, when no transaction is open
        except psycopg.Error:
            log.exception("store: rollback failed; reconnecting for the next batch")
            self._conn = None
            await conn.close()

    async def _disconnect(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _observe(self, writes: list[_Op], began: float) -> None:
        durable_at = time.perf_counter()
        try:
            if self._observe_commit is not None:
                self._observe_commit(durable_at - began)
            if self._observe_batch is not None:
                self._observe_batch(len(writes))
            if self._observe_write is not None:
                for op in writes:
                    self._observe_write(durable_at - op.queued_at)
        except Exception:  # a broken metric must not stop the writer
            log.exception("store: an observe hook failed")


_FENCED = "PF001"  # the SQLSTATE the fence raises: a class of our own


def _fence_check(epoch: int) -> str:
    """The statement that fails a transaction unless `epoch` is still the current term."""
    return (
        "DO $$BEGIN PERFORM 1 FROM coordinator_term WHERE id = 1 AND epoch = "
        f"{int(epoch)} FOR SHARE; IF NOT FOUND THEN RAISE EXCEPTION 'fenced' USING "
        f"ERRCODE = '{_FENCED}'; END IF; END$$; "
    )


def _neutral(error: Exception, context: str = "") -> Exception:
    """Backend errors become StoreError, so no psycopg type reaches a caller."""
    if isinstance(error, psycopg.Error) or context:
        neutral = StoreError(f"{context}{str(error).strip()}")
        neutral.__cause__ = error
        return neutral
    return error


async def _nothing(cur: Cursor) -> None:
    return None


async def _one_build(cur: Cursor, sql: str, args: Row) -> BuildRecord | None:
    await cur.execute(sql, args)
    row = await cur.fetchone()
    return None if row is None else build_from_row(row)


async def _all_builds(cur: Cursor, sql: str, args: Row) -> list[BuildRecord]:
    await cur.execute(sql, args)
    return [build_from_row(row) for row in await cur.fetchall()]

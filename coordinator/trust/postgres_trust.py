"""The TrustStore in PostgreSQL: reads from memory, writes through, LISTENs for other writers."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, overload

import psycopg
from psycopg import AsyncConnection, Connection, errors
from psycopg.conninfo import conninfo_to_dict

from polyarch.coordinator.core.postgres_schema import (
    TRUST_BOOTSTRAP_LOCK,
    TRUST_CHANNEL,
    migrate,
)
from polyarch.coordinator.core.store import StoreClosed, StoreError
from polyarch.coordinator.database_address import redacted_dsn
from polyarch.coordinator.trust.pki import CAMaterial
from polyarch.coordinator.trust.store import EnrolmentRecord, TokenRecord, TrustRows
from polyarch.proto.trust import Role

log = logging.getLogger(__name__)

# A write blocks its caller's thread, the event loop (see PostgresTrustStore): bound it.
WRITE_TIMEOUT_MS = 5_000
BOOTSTRAP_TIMEOUT_MS = 60_000  # waiting for another coordinator's bootstrap (milliseconds)
CONNECT_TIMEOUT_S = 5  # unless the connection string sets connect_timeout
QUIET_CHECK_S = 10.0  # a listener quiet this long checks its connection (a silent network)
RECONNECT_DELAYS_S = (0.1, 0.5, 1.0, 2.0, 5.0)

_TOKEN_COLUMNS = "id, role, secret_sha256, description, created_at, expires_at, revoked_at"
_ENROLMENT_COLUMNS = "name, cert_sha256, enrolled_at, token_id"
_ADD_TOKEN = f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
_ADD_ENROLMENT = f"INSERT INTO enrolments ({_ENROLMENT_COLUMNS}) VALUES (%s, %s, %s, %s)"
_SAVE_ENROLMENT = (
    f"{_ADD_ENROLMENT} ON CONFLICT (name) DO UPDATE SET cert_sha256 = excluded.cert_sha256, "
    "enrolled_at = excluded.enrolled_at, token_id = excluded.token_id"
)
_ADD_DRAIN = "INSERT INTO drained_agents (name, drained_at) VALUES (%s, %s) ON CONFLICT DO NOTHING"


def _token(row: Sequence[Any]) -> tuple[int, TokenRecord]:
    """(seq, record) from `seq, <_TOKEN_COLUMNS>`."""
    seq, token_id, role, digest, description, created, expires, revoked = row
    return int(seq), TokenRecord(token_id, Role(role), digest, description, created, expires,
                                 revoked)  # fmt: skip


def _token_values(token: TokenRecord) -> tuple[Any, ...]:
    return (token.id, token.role.value, token.secret_sha256, token.description,
            token.created_at, token.expires_at, token.revoked_at)  # fmt: skip


class PostgresTrustStore:
    """TrustStore shared by every coordinator on one PostgreSQL database (`await open(dsn)`).

    Reads never leave the process: `authenticate` runs on the event loop for every RPC, so
    tokens and enrolments are served from a view loaded at start. Writes go through to the
    database before they return (durable, as the contract says), then update the view.
    Writes use sync psycopg on their own connection, under a lock, on the caller's thread:
    the protocol is synchronous and its callers (TokenBook, the trust servicer) need the
    commit before they answer, so a thread would move the wait, not remove it. Writes are
    rare (tokens, enrolments, drains), one round trip each, and bounded (WRITE_TIMEOUT_MS,
    CONNECT_TIMEOUT_S): a dead database stalls the loop seconds at worst, and the write fails
    with StoreError. A lost writer connection fails that write (never retried: it may have
    committed) and is opened again for the next.

    Other coordinators' writes arrive by LISTEN/NOTIFY: a trigger announces each changed row
    and a listener task, on its own connection, reloads that row; whenever the listener
    (re)connects it reloads everything (notifications sent while it was away are lost). A
    revocation is final in the view (an older read never un-revokes a token); each one that
    arrives from elsewhere is announced to on_revoked's callbacks.
    """

    def __init__(self, dsn: str) -> None:
        """Use open(); the constructor connects nothing."""
        self._dsn = dsn
        self.where = f"the PostgreSQL database {redacted_dsn(dsn)}"
        self._lock = threading.RLock()  # the writer connection and the view
        self._writer: Connection[Any] | None = None
        self._tokens: dict[str, tuple[int, TokenRecord]] = {}
        self._enrolments: dict[str, EnrolmentRecord] = {}
        self._revoked_callbacks: list[Callable[[str], None]] = []
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        self.full_reloads = 0  # how often the whole view was read (each listener connection)

    @classmethod
    async def open(cls, dsn: str) -> PostgresTrustStore:
        """Migrates, loads the view, starts listening; raises StoreError naming the database."""
        store = cls(dsn)
        listening = await store._listening_connection()
        try:
            store._writer = await asyncio.to_thread(store._connect_writer)
        except BaseException:
            await listening.close()
            raise
        store._listener = asyncio.create_task(store._follow(listening), name="trust-listener")
        return store

    # ---- reads: the view ----------------------------------------------------
    def get_token(self, token_id: str) -> TokenRecord | None:
        with self._lock:
            found = self._tokens.get(token_id)
            return copy.copy(found[1]) if found else None

    def list_tokens(self) -> list[TokenRecord]:
        with self._lock:
            ordered = sorted(self._tokens.values(), key=lambda s: (s[1].created_at, s[0]))
            return [copy.copy(record) for _, record in ordered]

    def get_enrolment(self, name: str) -> EnrolmentRecord | None:
        with self._lock:
            found = self._enrolments.get(name)
            return copy.copy(found) if found else None

    def on_revoked(self, callback: Callable[[str], None]) -> None:
        self._revoked_callbacks.append(callback)

    # ---- writes: through to the database, then the view ---------------------
    def add_token(self, token: TokenRecord) -> None:
        with self._lock:
            try:
                row = self._execute(f"{_ADD_TOKEN} RETURNING seq", _token_values(token))
            except errors.UniqueViolation:
                raise ValueError(f"token {token.id} exists") from None
            assert row is not None
            self._tokens[token.id] = (int(row[0]), copy.copy(token))

    def revoke_token(self, token_id: str, at: float) -> TokenRecord | None:
        with self._lock:
            row = self._execute(
                "UPDATE tokens SET revoked_at = coalesce(revoked_at, %s) WHERE id = %s "
                f"RETURNING seq, {_TOKEN_COLUMNS}",
                (at, token_id),
            )
            if row is None:
                return None
            self._apply_token(token_id, row)
            return self.get_token(token_id)

    def save_enrolment(self, enrolment: EnrolmentRecord) -> None:
        with self._lock:
            self._execute(_SAVE_ENROLMENT, (enrolment.name, enrolment.cert_sha256,
                                            enrolment.enrolled_at, enrolment.token_id))  # fmt: skip
            self._enrolments[enrolment.name] = copy.copy(enrolment)

    def delete_enrolment(self, name: str) -> bool:
        with self._lock:
            row = self._execute("DELETE FROM enrolments WHERE name = %s RETURNING name", (name,))
            self._enrolments.pop(name, None)
            return row is not None

    def set_drained(self, name: str, drained: bool, at: float) -> None:
        if drained:
            self._execute(_ADD_DRAIN, (name, at))
        else:
            self._execute("DELETE FROM drained_agents WHERE name = %s", (name,))

    def drained_agents(self) -> list[str]:
        """From the database (not the view): the roster reads it once, at start."""
        rows = self._execute("SELECT name FROM drained_agents ORDER BY name", (), every=True)
        return [str(r[0]) for r in rows]

    # ---- the bootstrap: the shared CA and an upgrade's rows ------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One transaction on the writer connection under TRUST_BOOTSTRAP_LOCK, the view
        reloaded first: coordinators starting at once seed the shared state one after the
        other, and what one writes inside commits together (or not at all)."""
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                conn.execute(f"SET LOCAL statement_timeout = {BOOTSTRAP_TIMEOUT_MS}")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (TRUST_BOOTSTRAP_LOCK,))
                self._reload_view_sync()
                yield

    def _reload_view_sync(self) -> None:
        tokens = self._execute(f"SELECT seq, {_TOKEN_COLUMNS} FROM tokens", (), every=True)
        enrolments = self._execute(f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments", (), every=True)
        self._replace_view(tokens, enrolments)

    def shared_ca(self) -> CAMaterial | None:
        """The CA the database holds, if any."""
        row = self._execute("SELECT cert_pem, key_pem FROM certificate_authority", ())
        return None if row is None else CAMaterial(row[0].encode(), row[1].encode())

    def save_ca(self, material: CAMaterial, at: float) -> None:
        """Stores the farm's CA (within exclusive(), after shared_ca() found none)."""
        try:
            self._execute(
                "INSERT INTO certificate_authority (cert_pem, key_pem, created_at) "
                "VALUES (%s, %s, %s)",
                (material.cert_pem.decode(), material.key_pem.decode(), at),
            )
        except (StoreError, psycopg.Error) as error:
            # no message or cause of PostgreSQL's: a DETAIL could quote the row, key and all
            sqlstate = getattr(error.__cause__ or error, "sqlstate", None) or "no SQLSTATE"
            raise StoreError(f"cannot store the CA in {self.where} ({sqlstate})") from None

    def import_rows(self, rows: TrustRows, at: float) -> None:
        """Adds an upgraded coordinator's rows (within exclusive()); existing keys are kept."""
        with self._lock:
            for token in rows.tokens:
                self._execute(f"{_ADD_TOKEN} ON CONFLICT (id) DO NOTHING", _token_values(token))
            for e in rows.enrolments:
                self._execute(f"{_ADD_ENROLMENT} ON CONFLICT (name) DO NOTHING",
                              (e.name, e.cert_sha256, e.enrolled_at, e.token_id))  # fmt: skip
            for name in rows.drained:
                self._execute(_ADD_DRAIN, (name, at))
            self._reload_view_sync()

    # ---- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        """Stops the listener (its connection closes as the task ends) and the writer."""
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    async def aclose(self) -> None:
        """close(), waiting for the listener's connection to be closed."""
        self.close()
        if self._listener is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    # ---- the writer connection -------------------------------------------------
    def _connect_kwargs(self, role: str) -> dict[str, Any]:
        given = conninfo_to_dict(self._dsn)
        extra: dict[str, Any] = {"application_name": f"polyarch-trust-{role}"}
        if "connect_timeout" not in given:
            extra["connect_timeout"] = CONNECT_TIMEOUT_S
        return extra

    def _connect_writer(self) -> Connection[Any]:
        try:
            conn = Connection.connect(self._dsn, autocommit=True, **self._connect_kwargs("writer"))
        except psycopg.Error as error:  # libpq's message names host and user, never a password
            raise StoreError(f"cannot connect to {self.where}: {error}") from error
        conn.execute(f"SET statement_timeout = {WRITE_TIMEOUT_MS}")
        return conn

    def _connection(self) -> Connection[Any]:
        if self._closed:
            raise StoreClosed("the trust store was used after close()")
        if self._writer is None or self._writer.closed or self._writer.broken:
            self._writer = self._connect_writer()
        return self._writer

    @overload
    def _execute(self, sql: str, args: Sequence[Any]) -> tuple[Any, ...] | None: ...
    @overload
    def _execute(
        self, sql: str, args: Sequence[Any], every: Literal[True]
    ) -> list[tuple[Any, ...]]: ...
    def _execute(self, sql: str, args: Sequence[Any], every: bool = False) -> Any:
        """Runs one statement (autocommit: durable when it returns): its first row (None if
        none), or `every` row. A unique violation reaches the caller as it is; any other
        failure becomes StoreError (never with the statement's arguments)."""
        with self._lock:
            conn = self._connection()
            try:
                cursor = conn.execute(sql, args)
                if cursor.description is None:
                    return [] if every else None
                return cursor.fetchall() if every else cursor.fetchone()
            except errors.UniqueViolation:
                raise
            except psycopg.Error as error:
                if conn.broken:
                    self._writer = None  # opened again for the next call; this one failed
                raise StoreError(f"trust state in {self.where}: {error}") from error

    # ---- the view ------------------------------------------------------------------
    def _apply_token(self, token_id: str, row: Sequence[Any] | None) -> None:
        with self._lock:
            known = self._tokens.get(token_id)
            if row is None:
                self._tokens.pop(token_id, None)  # deleted by hand: unknown from now on
                return
            seq, record = _token(row)
            if known is not None and known[1].revoked_at is not None:
                record.revoked_at = known[1].revoked_at  # final: an older read never undoes it
            self._tokens[token_id] = (seq, record)
        if record.revoked_at is not None and (known is None or known[1].revoked_at is None):
            self._announce_revoked(token_id)

    def _apply_enrolment(self, name: str, row: Sequence[Any] | None) -> None:
        with self._lock:
            if row is None:
                self._enrolments.pop(name, None)
            else:
                self._enrolments[name] = EnrolmentRecord(*row)

    def _replace_view(
        self, tokens: Sequence[Sequence[Any]], enrolments: Sequence[Sequence[Any]]
    ) -> None:
        with self._lock:
            for gone in set(self._tokens) - {row[1] for row in tokens}:
                del self._tokens[gone]
            for row in tokens:
                self._apply_token(row[1], row)
            self._enrolments = {row[0]: EnrolmentRecord(*row) for row in enrolments}
            self.full_reloads += 1

    def _announce_revoked(self, token_id: str) -> None:
        for callback in self._revoked_callbacks:
            try:
                callback(token_id)
            except Exception:  # one broken subscriber must not stop the listener
                log.exception("trust: a revocation callback failed")

    # ---- the listener --------------------------------------------------------------
    async def _listening_connection(self) -> AsyncConnection[Any]:
        """A migrated connection that LISTENs, after which the whole view is reloaded (in
        that order: a change committed in between is in the reload or notified after it)."""
        try:
            conn = await AsyncConnection.connect(
                self._dsn, autocommit=True, **self._connect_kwargs("listener")
            )
        except psycopg.Error as error:
            raise StoreError(f"cannot connect to {self.where}: {error}") from error
        try:
            await migrate(conn, self.where)
            await conn.execute(f"LISTEN {TRUST_CHANNEL}")
            await self._reload_all(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _reload_all(self, conn: AsyncConnection[Any]) -> None:
        tokens = await (await conn.execute(f"SELECT seq, {_TOKEN_COLUMNS} FROM tokens")).fetchall()
        enrolments = await conn.execute(f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments")
        self._replace_view(tokens, await enrolments.fetchall())

    async def _follow(self, conn: AsyncConnection[Any]) -> None:
        """Relays notifications until cancelled; reconnects (and reloads) when the
        connection fails."""
        while True:
            try:
                await self._relay(conn)
            except Exception as error:  # whatever it was, a fresh connection and a full reload
                log.warning("trust: lost the notification connection to %s (%s); reconnecting",
                            self.where, str(error).strip() or type(error).__name__)  # fmt: skip
            finally:
                await conn.close()
            conn = await self._reconnect()
            log.info("trust: listening to %s again (view reloaded)", self.where)

    async def _reconnect(self) -> AsyncConnection[Any]:
        attempt = 0
        while True:
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1
            try:
                return await self._listening_connection()
            except Exception as error:  # keep trying: a stale view is worse than a retry
                log.warning("trust: cannot listen to %s yet (attempt %d): %s", self.where,
                            attempt, str(error).strip())  # fmt: skip

    async def _relay(self, conn: AsyncConnection[Any]) -> None:
        # notifies() holds the connection's lock while it yields, so the reloads run after
        # it returns (what arrives meanwhile waits in psycopg's backlog for the next round)
        while True:
            payloads = [n.payload async for n in conn.notifies(timeout=QUIET_CHECK_S,
                                                                stop_after=1)]  # fmt: skip
            if not payloads:
                await asyncio.wait_for(conn.execute("SELECT 1"), QUIET_CHECK_S)
            for payload in payloads:
                await self._reload(conn, payload)

    async def _reload(self, conn: AsyncConnection[Any], payload: str) -> None:
        try:
            change = json.loads(payload)
            table, key = str(change["table"]), change["key"]
        except (ValueError, KeyError, TypeError):
            log.warning("trust: ignored a malformed notification on %s", TRUST_CHANNEL)
            return
        if key is None:  # TRUNCATE
            await self._reload_all(conn)
        elif table == "tokens":
            sql = f"SELECT seq, {_TOKEN_COLUMNS} FROM tokens WHERE id = %s"
            self._apply_token(key, await (await conn.execute(sql, (key,))).fetchone())
        elif table == "enrolments":
            sql = f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments WHERE name = %s"
            self._apply_enrolment(key, await (await conn.execute(sql, (key,))).fetchone())

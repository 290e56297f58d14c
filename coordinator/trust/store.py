"""Durable trust state: API tokens (hashed), agent enrolments and drains, in SQLite or memory."""

from __future__ import annotations

import copy
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from polyarch.proto.trust import Role


@dataclass
class TokenRecord:
    """A token as stored: never its secret, only the secret's sha256."""

    id: str
    role: Role
    secret_sha256: str
    description: str
    created_at: float
    expires_at: float | None = None  # None: never
    revoked_at: float | None = None

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass
class EnrolmentRecord:
    """The certificate an agent name was last enrolled with, and by which token."""

    name: str
    cert_sha256: str
    enrolled_at: float
    token_id: str


class TrustStore(Protocol):
    """Tokens, enrolments and the names of drained agents (operator state that coordinators
    sharing a database share too). Every write is durable when it returns; reads are copies.

    Contract (tests/unit/test_trust_store.py runs it against every backend):
    - add_token refuses an id that exists (ValueError); get_token of an unknown id is None.
    - revoke_token sets revoked_at once and returns the record, None for an unknown id.
    - list_tokens is oldest first.
    - save_enrolment replaces the name's previous enrolment.
    - set_drained adds or removes a name; drained_agents lists the names, sorted.
    - on_revoked(callback): callback(token_id) when a revocation made elsewhere (another
      coordinator on a shared database) reaches this store; a local store never calls it.
    """

    def add_token(self, token: TokenRecord) -> None: ...
    def get_token(self, token_id: str) -> TokenRecord | None: ...
    def list_tokens(self) -> list[TokenRecord]: ...
    def revoke_token(self, token_id: str, at: float) -> TokenRecord | None: ...
    def save_enrolment(self, enrolment: EnrolmentRecord) -> None: ...
    def get_enrolment(self, name: str) -> EnrolmentRecord | None: ...
    def delete_enrolment(self, name: str) -> bool: ...
    def set_drained(self, name: str, drained: bool, at: float) -> None: ...
    def drained_agents(self) -> list[str]: ...
    def on_revoked(self, callback: Callable[[str], None]) -> None: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS enrolments (
    name TEXT PRIMARY KEY,
    cert_sha256 TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    token_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS drained_agents (
    name TEXT PRIMARY KEY,
    drained_at REAL NOT NULL
);
"""
_TOKEN_COLUMNS = "id, role, secret_sha256, description, created_at, expires_at, revoked_at"


def create_private_database(path: Path) -> None:
    """Creates the database file 0600 (and its folder 0700) before SQLite opens it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


class SQLiteTrustStore:
    """TrustStore in the coordinator's SQLite file (its own connection; WAL, synchronous)."""

    def __init__(self, path: Path) -> None:
        create_private_database(path)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def add_token(self, token: TokenRecord) -> None:
        with self._lock:
            try:
                self._db.execute(
                    f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                    (token.id, token.role.value, token.secret_sha256, token.description,
                     token.created_at, token.expires_at, token.revoked_at),
                )  # fmt: skip
            except sqlite3.IntegrityError:
                raise ValueError(f"token {token.id} exists") from None

    def get_token(self, token_id: str) -> TokenRecord | None:
        rows = self._query(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,))
        return _token(rows[0]) if rows else None

    def list_tokens(self) -> list[TokenRecord]:
        rows = self._query(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, rowid", ())
        return [_token(r) for r in rows]

    def revoke_token(self, token_id: str, at: float) -> TokenRecord | None:
        with self._lock:
            self._db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (at, token_id),
            )
        return self.get_token(token_id)

    def save_enrolment(self, enrolment: EnrolmentRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO enrolments (name, cert_sha256, enrolled_at, token_id) "
                "VALUES (?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "cert_sha256 = excluded.cert_sha256, enrolled_at = excluded.enrolled_at, "
                "token_id = excluded.token_id",
                (enrolment.name, enrolment.cert_sha256, enrolment.enrolled_at, enrolment.token_id),
            )

    def get_enrolment(self, name: str) -> EnrolmentRecord | None:
        rows = self._query(
            "SELECT name, cert_sha256, enrolled_at, token_id FROM enrolments WHERE name = ?",
            (name,),
        )
        return EnrolmentRecord(*rows[0]) if rows else None

    def delete_enrolment(self, name: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM enrolments WHERE name = ?", (name,))
        return cursor.rowcount > 0

    def set_drained(self, name: str, drained: bool, at: float) -> None:
        with self._lock:
            if drained:
                self._db.execute(
                    "INSERT INTO drained_agents (name, drained_at) VALUES (?, ?) "
                    "ON CONFLICT(name) DO NOTHING",
                    (name, at),
                )
            else:
                self._db.execute("DELETE FROM drained_agents WHERE name = ?", (name,))

    def drained_agents(self) -> list[str]:
        return [str(r[0]) for r in self._query("SELECT name FROM drained_agents ORDER BY name", ())]

    def on_revoked(self, callback: Callable[[str], None]) -> None:
        pass  # only this coordinator writes its file: TokenBook sees every revocation itself

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())


def _token(row: tuple[Any, ...]) -> TokenRecord:
    return TokenRecord(row[0], Role(row[1]), row[2], row[3], row[4], row[5], row[6])


class MemoryTrustStore:
    """TrustStore in memory (simulations and unit tests); same contract, nothing durable."""

    def __init__(self) -> None:
        self._tokens: dict[str, TokenRecord] = {}
        self._enrolments: dict[str, EnrolmentRecord] = {}
        self._drained: set[str] = set()

    def add_token(self, token: TokenRecord) -> None:
        if token.id in self._tokens:
            raise ValueError(f"token {token.id} exists")
        self._tokens[token.id] = copy.copy(token)

    def get_token(self, token_id: str) -> TokenRecord | None:
        token = self._tokens.get(token_id)
        return copy.copy(token) if token else None

    def list_tokens(self) -> list[TokenRecord]:
        ordered = sorted(self._tokens.values(), key=lambda t: t.created_at)  # stable: then added
        return [copy.copy(t) for t in ordered]

    def revoke_token(self, token_id: str, at: float) -> TokenRecord | None:
        token = self._tokens.get(token_id)
        if token is None:
            return None
        if token.revoked_at is None:
            token.revoked_at = at
        return copy.copy(token)

    def save_enrolment(self, enrolment: EnrolmentRecord) -> None:
        self._enrolments[enrolment.name] = copy.copy(enrolment)

    def get_enrolment(self, name: str) -> EnrolmentRecord | None:
        enrolment = self._enrolments.get(name)
        return copy.copy(enrolment) if enrolment else None

    def delete_enrolment(self, name: str) -> bool:
        return self._enrolments.pop(name, None) is not None

    def set_drained(self, name: str, drained: bool, at: float) -> None:
        if drained:
            self._drained.add(name)
        else:
            self._drained.discard(name)

    def drained_agents(self) -> list[str]:
        return sorted(self._drained)

    def on_revoked(self, callback: Callable[[str], None]) -> None:
        pass  # nothing else writes here

    def close(self) -> None:
        pass


@dataclass
class TrustRows:
    """A whole trust state as rows: what an upgrade carries from SQLite into PostgreSQL."""

    tokens: list[TokenRecord]
    enrolments: list[EnrolmentRecord]
    drained: list[str]

    def __bool__(self) -> bool:
        return bool(self.tokens or self.enrolments or self.drained)


def read_sqlite_trust(path: Path) -> TrustRows:
    """The trust rows of a coordinator's state.sqlite3, read-only; empty if there is none."""
    if not path.exists():
        return TrustRows([], [], [])
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        tokens = enrolments = drained = []
        if "tokens" in tables:
            rows = db.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, rowid")
            tokens = [_token(r) for r in rows]
        if "enrolments" in tables:
            rows = db.execute("SELECT name, cert_sha256, enrolled_at, token_id FROM enrolments")
            enrolments = [EnrolmentRecord(*r) for r in rows]
        if "drained_agents" in tables:
            drained = [str(r[0]) for r in db.execute("SELECT name FROM drained_agents")]
        return TrustRows(tokens, enrolments, drained)
    finally:
        db.close()

"""The TrustStore contract, run against every backend."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from polyarch.coordinator.trust.postgres_trust import PostgresTrustStore
from polyarch.coordinator.trust.store import (
    EnrolmentRecord,
    MemoryTrustStore,
    SQLiteTrustStore,
    TokenRecord,
    TrustStore,
)
from polyarch.proto.trust import Role


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TrustStore]:
    if request.param == "postgres":
        # its listener is an asyncio task: it runs while this runner does (open, close); the
        # sync contract needs none of it, since a store's own writes update its view
        with asyncio.Runner() as runner:
            shared = runner.run(PostgresTrustStore.open(request.getfixturevalue("postgres_dsn")))
            yield shared
            runner.run(shared.aclose())
        return
    backend: TrustStore = (
        SQLiteTrustStore(tmp_path / "db" / "state.sqlite3")
        if request.param == "sqlite"
        else MemoryTrustStore()
    )
    yield backend
    backend.close()


def token(token_id: str, at: float) -> TokenRecord:
    return TokenRecord(token_id, Role.CI, "ab" * 32, f"token {token_id}", at)


def test_tokens_are_stored_listed_and_revoked_once(store: TrustStore) -> None:
    store.add_token(token("000000000001", 2.0))
    store.add_token(token("000000000002", 1.0))
    with pytest.raises(ValueError, match="exists"):
        store.add_token(token("000000000001", 3.0))
    assert [t.id for t in store.list_tokens()] == ["000000000002", "000000000001"]
    assert store.get_token("nope") is None
    first = store.revoke_token("000000000001", 10.0)
    assert first is not None and first.revoked_at == 10.0
    again = store.revoke_token("000000000001", 20.0)
    assert again is not None and again.revoked_at == 10.0
    assert store.revoke_token("nope", 1.0) is None
    fetched = store.get_token("000000000002")
    assert fetched is not None and fetched.role is Role.CI and fetched.usable(5.0)
    fetched.description = "changed"  # reads are copies
    assert store.get_token("000000000002") == token("000000000002", 1.0)


def test_an_enrolment_replaces_the_previous_one(store: TrustStore) -> None:
    store.save_enrolment(EnrolmentRecord("arm-1", "a" * 64, 1.0, "t1"))
    store.save_enrolment(EnrolmentRecord("arm-1", "b" * 64, 2.0, "t2"))
    assert store.get_enrolment("arm-1") == EnrolmentRecord("arm-1", "b" * 64, 2.0, "t2")
    assert store.get_enrolment("arm-2") is None


def test_a_deleted_enrolment_is_gone_and_deleting_twice_says_so(store: TrustStore) -> None:
    store.save_enrolment(EnrolmentRecord("arm-1", "a" * 64, 1.0, "t1"))
    assert store.delete_enrolment("arm-1")
    assert store.get_enrolment("arm-1") is None
    assert not store.delete_enrolment("arm-1")


def test_drains_are_kept_until_undrained(store: TrustStore) -> None:
    store.set_drained("arm-2", True, 1.0)
    store.set_drained("arm-1", True, 2.0)
    store.set_drained("arm-1", True, 3.0)  # twice: still one name
    assert store.drained_agents() == ["arm-1", "arm-2"]
    store.set_drained("arm-2", False, 4.0)
    store.set_drained("never-drained", False, 5.0)
    assert store.drained_agents() == ["arm-1"]


def test_the_sqlite_file_is_private(tmp_path: Path) -> None:
    SQLiteTrustStore(tmp_path / "data" / "state.sqlite3").close()
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "data" / "state.sqlite3").stat().st_mode & 0o777 == 0o600

"""Two PostgresTrustStores on one database (a real server): what one writes, the other sees."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from polyarch.coordinator.core.store import StoreError
from polyarch.coordinator.trust.pki import CAMaterial
from polyarch.coordinator.trust.postgres_trust import PostgresTrustStore
from polyarch.coordinator.trust.setup import shared_ca
from polyarch.coordinator.trust.store import EnrolmentRecord, TokenRecord
from polyarch.proto.trust import Role
from tests.support.poll import poll_until

# "about a second" (the issue): a revocation on one coordinator cuts the token off on another
PROPAGATION_DEADLINE = 1.5


def token(token_id: str) -> TokenRecord:
    return TokenRecord(token_id, Role.CI, "ab" * 32, f"token {token_id}", time.time())


@pytest.fixture
async def pair(postgres_dsn: str) -> AsyncIterator[tuple[PostgresTrustStore, PostgresTrustStore]]:
    first = await PostgresTrustStore.open(postgres_dsn)
    second = await PostgresTrustStore.open(postgres_dsn)
    yield first, second
    await first.aclose()
    await second.aclose()


async def test_writes_on_one_store_reach_the_others_view(
    pair: tuple[PostgresTrustStore, PostgresTrustStore],
) -> None:
    here, there = pair
    revoked_there: list[str] = []
    there.on_revoked(revoked_there.append)

    here.add_token(token("0000000000a1"))
    await poll_until(lambda: there.get_token("0000000000a1"), timeout=PROPAGATION_DEADLINE,
                     message="a token made on one store is in the other's view")  # fmt: skip
    began = time.monotonic()
    here.revoke_token("0000000000a1", 50.0)
    seen = await poll_until(
        lambda: (t := there.get_token("0000000000a1")) is not None and t.revoked_at == 50.0,
        timeout=PROPAGATION_DEADLINE, message="the revocation reached the other store",
    )  # fmt: skip
    assert seen and time.monotonic() - began < PROPAGATION_DEADLINE
    assert revoked_there == ["0000000000a1"]  # announced once, to the other's TokenBook

    here.save_enrolment(EnrolmentRecord("arm-1", "a" * 64, 1.0, "0000000000a1"))
    await poll_until(lambda: there.get_enrolment("arm-1"), timeout=PROPAGATION_DEADLINE,
                     message="an enrolment reached the other store")  # fmt: skip
    assert here.delete_enrolment("arm-1")
    await poll_until(lambda: there.get_enrolment("arm-1") is None,
                     timeout=PROPAGATION_DEADLINE, message="the deletion reached it")  # fmt: skip
    assert not there.delete_enrolment("arm-1")  # the database agrees: nothing left to delete


async def test_a_revocation_is_final_in_the_view(postgres_dsn: str) -> None:
    store = await PostgresTrustStore.open(postgres_dsn)
    try:
        store.add_token(token("0000000000b1"))
        store.revoke_token("0000000000b1", 7.0)
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as db:
            await db.execute("UPDATE tokens SET revoked_at = NULL, description = 'by hand'")
        await poll_until(
            lambda: (t := store.get_token("0000000000b1")) and t.description == "by hand",
            timeout=PROPAGATION_DEADLINE, message="the hand-made update reached the view",
        )  # fmt: skip
        still = store.get_token("0000000000b1")
        assert still is not None and still.revoked_at == 7.0
    finally:
        await store.aclose()


async def test_a_reconnected_listener_reloads_what_it_missed(
    pair: tuple[PostgresTrustStore, PostgresTrustStore], postgres_dsn: str
) -> None:
    here, there = pair
    revoked_there: list[str] = []
    there.on_revoked(revoked_there.append)
    here.add_token(token("0000000000c1"))
    await poll_until(lambda: there.get_token("0000000000c1"), timeout=PROPAGATION_DEADLINE,
                     message="the token reached the other store")  # fmt: skip
    reloads = there.full_reloads
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as db:
        # a change nobody is told of (as one made while a listener is disconnected) ...
        await db.execute("ALTER TABLE tokens DISABLE TRIGGER tokens_changed")
        await db.execute("UPDATE tokens SET revoked_at = 9.0 WHERE id = '0000000000c1'")
        await db.execute("ALTER TABLE tokens ENABLE TRIGGER tokens_changed")
        # ... then every listener's connection drops; the writers' stay
        cursor = await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'polyarch-trust-listener' AND datname = current_database()"
        )
        assert [row[0] for row in await cursor.fetchall()] == [True, True]
    await poll_until(lambda: there.full_reloads > reloads, timeout=10,
                     message="the listener reconnected and reloaded")  # fmt: skip
    reloaded = there.get_token("0000000000c1")
    assert reloaded is not None and reloaded.revoked_at == 9.0
    assert revoked_there == ["0000000000c1"]
    # and it listens again: a new change arrives as before
    here.add_token(token("0000000000c2"))
    await poll_until(lambda: there.get_token("0000000000c2"), timeout=PROPAGATION_DEADLINE,
                     message="a change after the reconnection reached the other store")  # fmt: skip


async def test_a_write_to_an_unreachable_database_fails_with_a_clear_error(
    postgres_dsn: str,
) -> None:
    store = await PostgresTrustStore.open(postgres_dsn)
    try:
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as db:
            await db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'polyarch-trust-writer'"
            )
        with pytest.raises(StoreError, match=r"trust state in the PostgreSQL database postgres"):
            store.add_token(token("0000000000d1"))  # the connection died under it: not retried
        assert store.get_token("0000000000d1") is None
        store.add_token(token("0000000000d2"))  # the next write opens a new connection
        assert store.get_token("0000000000d2") is not None
    finally:
        await store.aclose()


async def test_stores_seeding_at_once_agree_on_one_ca(postgres_dsn: str) -> None:
    stores = [await PostgresTrustStore.open(postgres_dsn) for _ in range(4)]
    start = threading.Barrier(len(stores))

    def seed(store: PostgresTrustStore) -> CAMaterial:
        start.wait(timeout=30)  # all four ask at once, each on its own connection
        with store.exclusive():
            return shared_ca(store, None)

    try:
        agreed = await asyncio.gather(*(asyncio.to_thread(seed, s) for s in stores))
        assert len({ca.sha256 for ca in agreed}) == 1
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as db:
            rows = await (await db.execute("SELECT cert_pem FROM certificate_authority")).fetchall()
        assert [row[0].encode() for row in rows] == [agreed[0].cert_pem]
    finally:
        for store in stores:
            await store.aclose()

"""Electing the active coordinator on a real PostgreSQL: one at a time, terms fence the store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from polyarch.coordinator.core.postgres_store import PostgresStore
from polyarch.coordinator.core.store import Fenced
from polyarch.coordinator.ha.election import MAX_LEASE, Election
from tests.support.pg_partition import FreezableProxy, via_port
from tests.unit.test_store_contract import make_build


async def test_one_wins_and_the_other_waits_until_it_resigns(postgres_dsn: str) -> None:
    first = Election(postgres_dsn, "a.example:7600", retry=0.2)
    second = Election(postgres_dsn, "b.example:7600", retry=0.2)
    term = await asyncio.wait_for(first.campaign(), 10)
    assert (term.epoch, term.holder) == (1, "a.example:7600")
    waiting = asyncio.create_task(second.campaign())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiting), 1.5)  # held: no second winner
    assert (await second.active()) == term
    await first.resign()
    taken = await asyncio.wait_for(waiting, 10)
    assert (taken.epoch, taken.holder) == (2, "b.example:7600")
    assert (await first.active()) == taken
    await second.resign()


async def test_a_killed_session_ends_the_term_and_the_standby_takes_over(
    postgres_dsn: str,
) -> None:
    active = Election(postgres_dsn, "a:7600", lease=4.0, retry=0.2)
    standby = Election(postgres_dsn, "b:7600", retry=0.2)
    await asyncio.wait_for(active.campaign(), 10)
    holding = asyncio.create_task(active.hold())
    waiting = asyncio.create_task(standby.campaign())
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'polyarch-election' AND pid IN "
            "(SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"
        )
    reason = await asyncio.wait_for(holding, 10)
    assert "failed" in reason
    taken = await asyncio.wait_for(waiting, 10)
    assert (taken.epoch, taken.holder) == (2, "b:7600")
    await standby.resign()


async def test_a_fenced_store_writes_nothing_after_a_takeover(postgres_dsn: str) -> None:
    old = Election(postgres_dsn, "a:7600", retry=0.2)
    new = Election(postgres_dsn, "b:7600", retry=0.2)
    old_term = await old.campaign()
    old_store = await PostgresStore.open(postgres_dsn)
    old_store.fence_epoch = old_term.epoch
    await old_store.create_build(*make_build("before", 1.0))  # its term: accepted

    await old.resign()
    new_term = await asyncio.wait_for(new.campaign(), 10)
    new_store = await PostgresStore.open(postgres_dsn)
    new_store.fence_epoch = new_term.epoch
    with pytest.raises(Fenced, match=f"term {old_term.epoch} has ended"):
        await old_store.create_build(*make_build("stale", 2.0))
    await new_store.create_build(*make_build("after", 3.0))
    assert await new_store.get_build("stale") is None
    assert {b.id for b in await new_store.unfinished_builds()} == {"before", "after"}
    for store in (old_store, new_store):
        await store.close()
    await new.resign()


async def test_a_silent_database_ends_the_term_within_the_lease_before_a_standby_wins(
    postgres_dsn: str, tmp_path: Path
) -> None:
    proxy = FreezableProxy(urlsplit(postgres_dsn).port or 5432)
    port = await proxy.start()
    lease = 3.0
    active = Election(via_port(postgres_dsn, port, tmp_path), "a:7600", lease=lease, retry=0.2)
    standby = Election(postgres_dsn, "b:7600", retry=0.2)
    try:
        await asyncio.wait_for(active.campaign(), 10)
        holding = asyncio.create_task(active.hold())
        waiting = asyncio.create_task(standby.campaign())
        await asyncio.sleep(1.0)  # a renewal or two go through first
        assert not holding.done() and not waiting.done()

        proxy.frozen.set()
        frozen_at = time.monotonic()
        reason = await asyncio.wait_for(holding, lease + 3)
        stepped_down = time.monotonic()
        assert "did not answer" in reason
        assert stepped_down - frozen_at <= lease + 1.0
        assert not waiting.done()  # the server still holds the silent session's lock

        proxy.cut_server_side()  # the server gives up on the silent peer
        taken = await asyncio.wait_for(waiting, 10)
        assert time.monotonic() > stepped_down and taken.epoch == 2
    finally:
        await proxy.close()
        await standby.resign()
        await active.resign()


def test_a_lease_the_server_could_outlast_is_refused() -> None:
    with pytest.raises(ValueError, match="lease must be within"):
        Election("postgresql://x@127.0.0.1/db", "a:7600", lease=MAX_LEASE + 1)


async def test_a_hung_active_is_ended_by_the_standby_and_a_live_one_is_not(
    postgres_dsn: str,
) -> None:
    """A frozen active keeps its session (its kernel answers keepalives) but stops renewing:
    the standby ends that session and wins. One that renews is never touched."""
    live = Election(postgres_dsn, "a:7600", lease=2.0, retry=0.2)
    standby = Election(postgres_dsn, "b:7600", retry=0.2)
    standby.hung_after = 1.5
    await asyncio.wait_for(live.campaign(), 10)
    holding = asyncio.create_task(live.hold())  # renews every lease/4
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(standby.campaign(), 4.0)
    assert not holding.done()
    await live.resign()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(holding, 5)

    hung = Election(postgres_dsn, "c:7600", lease=2.0, retry=0.2)
    term = await asyncio.wait_for(hung.campaign(), 10)  # and then no hold(): no renewals
    taken = await asyncio.wait_for(standby.campaign(), 10)
    assert taken.epoch == term.epoch + 1 and taken.holder == "b:7600"
    reason = await asyncio.wait_for(hung.hold(), 10)  # it wakes up: its session is gone
    assert "failed" in reason or "did not answer" in reason
    await standby.resign()

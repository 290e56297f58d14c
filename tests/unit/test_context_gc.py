"""Context garbage collection: the selection rule, and one pass over a real ContextStore."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polyarch.coordinator.contexts.gc import ContextCollector, select_for_deletion
from polyarch.coordinator.contexts.store import ContextStore, StoredContext
from polyarch.coordinator.limits import Limits

NOW = 1_000_000.0
DAY = 86400.0


def ctx(name: str, size: int, age: float) -> StoredContext:
    return StoredContext("sha256:" + name * 64, size, NOW - age)


def chosen(
    entries: list[StoredContext],
    in_use: set[str] = frozenset(),  # type: ignore[assignment]
    max_age: float = 7 * DAY,
    max_total: int = 10**9,
) -> list[str]:
    picked = select_for_deletion(entries, set(in_use), NOW, max_age, max_total)
    return [item.digest[7] for item in picked]


def test_nothing_to_delete_in_an_empty_or_small_young_store() -> None:
    assert chosen([]) == []
    assert chosen([ctx("a", 10, DAY), ctx("b", 10, 2 * DAY)]) == []


def test_unused_contexts_older_than_the_age_go() -> None:
    entries = [ctx("a", 10, 8 * DAY), ctx("b", 10, 6 * DAY), ctx("c", 10, 30 * DAY)]
    assert chosen(entries) == ["c", "a"]  # oldest first


def test_exactly_the_max_age_is_not_older_than_it() -> None:
    assert chosen([ctx("a", 10, 7 * DAY)]) == []
    assert chosen([ctx("a", 10, 7 * DAY + 0.001)]) == ["a"]


def test_a_context_in_use_is_never_deleted_however_old() -> None:
    old = ctx("a", 10, 365 * DAY)
    assert chosen([old], in_use={old.digest}) == []
    assert chosen([old], in_use={old.digest}, max_total=0) == []


def test_over_the_total_the_oldest_unused_go_until_it_fits() -> None:
    entries = [ctx("a", 40, 3 * DAY), ctx("b", 40, 2 * DAY), ctx("c", 40, 1 * DAY)]
    assert chosen(entries, max_total=120) == []
    assert chosen(entries, max_total=119) == ["a"]
    assert chosen(entries, max_total=80) == ["a"]
    assert chosen(entries, max_total=79) == ["a", "b"]
    assert chosen(entries, max_total=0) == ["a", "b", "c"]


def test_the_total_counts_contexts_in_use_but_skips_them() -> None:
    entries = [ctx("a", 100, 3 * DAY), ctx("b", 40, 2 * DAY), ctx("c", 40, 1 * DAY)]
    # a (in use) alone is over 90: every unused one goes, and a stays
    assert chosen(entries, in_use={entries[0].digest}, max_total=90) == ["b", "c"]
    assert chosen(entries, in_use={entries[0].digest}, max_total=140) == ["b"]


def test_age_deletions_count_toward_the_total() -> None:
    entries = [ctx("a", 100, 10 * DAY), ctx("b", 40, 2 * DAY), ctx("c", 40, 1 * DAY)]
    assert chosen(entries, max_total=80) == ["a"]


def test_ties_in_age_go_by_digest_and_input_order_does_not_matter() -> None:
    entries = [ctx("c", 10, DAY), ctx("a", 10, DAY), ctx("b", 10, DAY)]
    assert chosen(entries, max_total=10) == ["a", "b"]
    assert chosen(list(reversed(entries)), max_total=10) == ["a", "b"]


def test_a_last_use_in_the_future_is_young() -> None:
    assert chosen([ctx("a", 10, -DAY)], max_age=0) == []


def test_in_use_digests_not_stored_change_nothing() -> None:
    entries = [ctx("a", 10, 8 * DAY)]
    assert chosen(entries, in_use={"sha256:" + "f" * 64}) == ["a"]


# ---- one pass over a real store ------------------------------------------------------------


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _stored(store: ContextStore, data: bytes, age: float) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await store.write(digest, len(data), _one(data))
    when = time.time() - age
    os.utime(store.path_for(digest), (when, when))
    return digest


@pytest.fixture
def store(tmp_path: Path) -> ContextStore:
    limits = Limits(context_gc_max_age_seconds=7 * DAY, context_gc_max_total_bytes=250,
                    upload_deadline_seconds=3600)  # fmt: skip
    return ContextStore(tmp_path, limits)


async def test_a_pass_deletes_old_and_excess_contexts_but_not_those_in_use(
    store: ContextStore,
) -> None:
    old = await _stored(store, b"o" * 100, 8 * DAY)
    busy = await _stored(store, b"b" * 100, 30 * DAY)
    older = await _stored(store, b"x" * 100, 3 * DAY)
    newer = await _stored(store, b"n" * 100, 1 * DAY)
    deleted: list[tuple[int, int]] = []
    collector = ContextCollector(store, lambda: {busy}, lambda n, s: deleted.append((n, s)))
    report = await collector.collect()
    assert (report.deleted, report.deleted_bytes, report.kept_bytes) == (2, 200, 200)
    assert deleted == [(2, 200)]
    assert store.size_of(old) is None and store.size_of(older) is None
    assert store.size_of(busy) == 100 and store.size_of(newer) == 100
    assert os.listdir(store.root / "tmp") == []


async def test_a_context_used_during_the_scan_is_kept(store: ContextStore) -> None:
    old = await _stored(store, b"o" * 100, 8 * DAY)
    calls = 0

    def in_use() -> set[str]:
        nonlocal calls
        calls += 1
        # the first call chooses; by the re-check a build has been submitted with it
        return set() if calls == 1 else {old}

    report = await ContextCollector(store, in_use).collect()
    assert report.deleted == 0 and store.size_of(old) == 100


async def test_a_context_looked_up_after_the_scan_is_kept(store: ContextStore) -> None:
    old = await _stored(store, b"o" * 100, 8 * DAY)
    [item] = store.scan()
    store.size_of(old)  # a client's stat, moving its mtime on
    assert store.detach(item) is None
    assert store.size_of(old) == 100


async def test_stale_temp_files_are_swept_and_fresh_ones_kept(store: ContextStore) -> None:
    stale, fresh = store.root / "tmp" / "stale", store.root / "tmp" / "fresh"
    stale.write_bytes(b"s")
    fresh.write_bytes(b"f")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    report = await ContextCollector(store, set).collect()
    assert report.temp_files_removed == 1
    assert sorted(os.listdir(store.root / "tmp")) == ["fresh"]

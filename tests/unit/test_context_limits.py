"""ContextStore and upload limits: declared size, oversend, undersend, slots, idle and deadline."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polyarch.coordinator.contexts.store import ContextStore
from polyarch.coordinator.contexts.uploads import UploadSlots, timed
from polyarch.coordinator.core.model import InvalidRequest, LimitExceeded
from polyarch.coordinator.limits import Limits

LIMITS = Limits(max_context_bytes=1000, max_concurrent_uploads=3,
                max_concurrent_uploads_per_caller=2)  # fmt: skip


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def stream(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def leftovers(root: Path) -> list[str]:
    return sorted(os.listdir(root / "sha256")) + sorted(os.listdir(root / "tmp"))


@pytest.fixture
def store(tmp_path: Path) -> ContextStore:
    return ContextStore(tmp_path, LIMITS)


async def test_a_context_within_the_limit_is_stored(store: ContextStore) -> None:
    data = b"x" * 1000
    assert await store.write(digest_of(data), len(data), stream(data[:400], data[400:]))
    assert store.size_of(digest_of(data)) == 1000
    assert store.stored_bytes == 1000
    assert not await store.write(digest_of(data), len(data), stream(data))  # already there


async def test_a_declared_size_over_the_limit_is_refused_before_reading(
    store: ContextStore,
) -> None:
    read = []

    async def chunks() -> AsyncIterator[bytes]:
        read.append(1)
        yield b"x"

    with pytest.raises(LimitExceeded) as refused:
        await store.write("sha256:" + "a" * 64, 1 << 62, chunks())
    assert str(1 << 62) in str(refused.value)
    assert "max_context_bytes=1000" in str(refused.value)
    assert read == [] and leftovers(store.root) == []


async def test_oversend_is_refused_at_the_first_chunk_past_the_declared_size(
    store: ContextStore,
) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 1
            yield b"y" * 100

    with pytest.raises(InvalidRequest, match="exceeds its declared size 250"):
        await store.write("sha256:" + "b" * 64, 250, endless())
    assert sent == 3
    assert leftovers(store.root) == []


async def test_undersend_and_a_wrong_digest_are_refused_at_the_end(store: ContextStore) -> None:
    data = b"z" * 100
    with pytest.raises(InvalidRequest, match=r"received .* \(60 bytes\)"):
        await store.write(digest_of(data), 100, stream(data[:60]))
    with pytest.raises(InvalidRequest, match="does not match its digest"):
        await store.write(digest_of(data), 100, stream(b"q" * 100))
    assert leftovers(store.root) == []


async def test_a_failing_sender_leaves_nothing_behind(store: ContextStore) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * 10
        raise LimitExceeded("idle")

    with pytest.raises(LimitExceeded):
        await store.write("sha256:" + "c" * 64, 100, broken())
    assert leftovers(store.root) == []


async def test_a_lookup_counts_as_a_use(store: ContextStore) -> None:
    data = b"used"
    await store.write(digest_of(data), len(data), stream(data))
    path = store.path_for(digest_of(data))
    os.utime(path, (1000.0, 1000.0))
    assert store.size_of(digest_of(data)) == 4
    assert path.stat().st_mtime > time.time() - 60


def test_slots_cap_each_caller_and_the_total() -> None:
    slots = UploadSlots(LIMITS)
    with slots.claim("a"), slots.claim("a"):
        over_caller = pytest.raises(LimitExceeded, match="max_concurrent_uploads_per_caller=2")
        with over_caller, slots.claim("a"):
            pass
        with slots.claim("b"):
            assert slots.in_flight == 3
            with pytest.raises(LimitExceeded, match="max_concurrent_uploads=3"), slots.claim("c"):
                pass
        assert slots.of("a") == 2 and slots.in_flight == 2
    assert slots.in_flight == 0 and slots.of("a") == 0


def test_a_slot_is_released_when_the_upload_fails() -> None:
    slots = UploadSlots(LIMITS)
    with pytest.raises(RuntimeError), slots.claim(""):
        raise RuntimeError("upload broke")
    assert slots.in_flight == 0


async def _stalls_after(*items: int) -> AsyncIterator[int]:
    for item in items:
        yield item
    await asyncio.Event().wait()
    yield -1  # unreachable: mypy needs the generator to yield ints


async def test_timed_refuses_an_idle_sender() -> None:
    got = []
    started = time.monotonic()
    with pytest.raises(LimitExceeded, match=r"upload_idle_seconds=0\.2"):
        async for item in timed(_stalls_after(1, 2), idle_seconds=0.2, deadline_seconds=60):
            got.append(item)
    assert got == [1, 2]
    assert 0.15 < time.monotonic() - started < 5


async def test_timed_refuses_a_first_chunk_that_never_comes() -> None:
    with pytest.raises(LimitExceeded, match="upload_idle_seconds"):
        await anext(timed(_stalls_after(), idle_seconds=0.1, deadline_seconds=60))


async def test_timed_refuses_a_trickle_past_the_deadline() -> None:
    async def trickle() -> AsyncIterator[int]:
        for item in range(1000):
            await asyncio.sleep(0.05)
            yield item

    got = []
    with pytest.raises(LimitExceeded, match=r"upload_deadline_seconds=0\.3"):
        async for item in timed(trickle(), idle_seconds=1, deadline_seconds=0.3):
            got.append(item)
    assert 2 <= len(got) <= 7


async def test_timed_passes_a_prompt_stream_through() -> None:
    got = [item async for item in timed(_finite(), idle_seconds=1, deadline_seconds=1)]
    assert got == [0, 1, 2]


async def _finite() -> AsyncIterator[int]:
    for item in range(3):
        yield item

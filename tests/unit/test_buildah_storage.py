"""StorageUsers: builds in one storage run together; image removal waits for a quiet storage."""

from __future__ import annotations

import asyncio
from pathlib import Path

from polyarch.agent.builders.base import BuildRequest
from polyarch.agent.builders.buildah import BuildahBuilder
from polyarch.agent.builders.buildah_storage import StorageUsers, default_run_root
from polyarch.proto.platforms import parse_platform


class Remover:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, images: list[str]) -> None:
        await self.release.wait()
        self.batches.append(images)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_removal_waits_until_the_last_build_leaves() -> None:
    remover = Remover()
    users = StorageUsers(remover, batch=1)
    first_done, second_done = asyncio.Event(), asyncio.Event()

    async def build(image: str, done: asyncio.Event) -> None:
        async with users.building():
            users.remove_later(image)
            await done.wait()

    first = asyncio.create_task(build("a", first_done))
    second = asyncio.create_task(build("b", second_done))
    await settle()
    assert users.active == 2
    first_done.set()
    await first
    assert remover.batches == [], "removed while another build still used the storage"
    assert users.deferred == ("a", "b")
    second_done.set()
    await second  # the last build leaves at once: the removal runs in the background
    await users.idle()
    assert remover.batches == [["a", "b"]]
    assert users.deferred == () and users.active == 0


async def test_new_builds_wait_while_a_removal_runs() -> None:
    remover = Remover()
    remover.release.clear()
    users = StorageUsers(remover, batch=1)

    async def first() -> None:
        async with users.building():
            users.remove_later("x")

    # leaving the last build starts the removal, which blocks on release
    starter = asyncio.create_task(first())
    await settle()
    assert users.active == 0 and users.deferred == ()
    entered = asyncio.Event()
    waiter = asyncio.create_task(next_build_on(users, entered))
    await settle()
    assert not entered.is_set(), "a build started during a removal"
    assert starter.done(), "the leaving build waited for the removal"
    remover.release.set()
    await asyncio.wait_for(asyncio.gather(starter, waiter), 5)
    assert entered.is_set()
    assert remover.batches == [["x"]]


async def next_build_on(users: StorageUsers, entered: asyncio.Event) -> None:
    async with users.building():
        entered.set()


async def test_a_full_queue_makes_new_builds_wait_for_quiet() -> None:
    remover = Remover()
    users = StorageUsers(remover, max_deferred=2, batch=1)
    hold = asyncio.Event()

    async def long_build() -> None:
        async with users.building():
            await hold.wait()

    runner = asyncio.create_task(long_build())
    await settle()
    for image in ("a", "b"):
        async with users.building():
            users.remove_later(image)
    assert users.deferred == ("a", "b") and remover.batches == []
    entered = asyncio.Event()
    late = asyncio.create_task(next_build_on(users, entered))
    await settle()
    assert not entered.is_set(), "the queue is full: new builds must wait for quiet"
    hold.set()
    await asyncio.wait_for(asyncio.gather(runner, late), 5)
    assert remover.batches == [["a", "b"]] and entered.is_set()


async def test_a_cancelled_removal_is_queued_again() -> None:
    remover = Remover()
    remover.release.clear()
    users = StorageUsers(remover, batch=1)
    async with users.building():
        users.remove_later("a")
    await settle()
    (removal,) = users._removals  # e.g. the agent shutting down mid-removal
    removal.cancel()
    await users.idle()
    assert users.deferred == ("a",)
    remover.release.set()
    async with users.building():
        pass
    await users.idle()
    assert remover.batches == [["a"]]


async def test_removal_waits_for_a_batch_of_images() -> None:
    remover = Remover()
    users = StorageUsers(remover, batch=3)
    for image in ("a", "b"):
        async with users.building():
            users.remove_later(image)
    await users.idle()
    assert remover.batches == [] and users.deferred == ("a", "b")
    async with users.building():
        users.remove_later("c")
    await users.idle()
    assert remover.batches == [["a", "b", "c"]] and users.deferred == ()


def test_each_platform_builds_in_its_own_storage(tmp_path: Path) -> None:
    builder = BuildahBuilder(storage_root=tmp_path / "storage", run_root=tmp_path / "run")
    roots = set()
    for platform in ("linux/amd64", "linux/arm64", "linux/arm/v7"):
        request = BuildRequest(
            context_dir=tmp_path, dockerfile="Dockerfile", platform=parse_platform(platform),
            image="127.0.0.1:5000/a/b:job",
        )  # fmt: skip
        argv, _ = builder.build_command(request, "/abs/Dockerfile")
        push = builder.push_command(request, tmp_path / "digest")
        slug = parse_platform(platform).slug
        for command in (argv, push):
            storage, run = tmp_path / "storage" / slug, tmp_path / "run" / slug
            assert command[1:5] == ["--root", str(storage), "--runroot", str(run)]
        roots.add(argv[2])
    assert len(roots) == 3


def test_run_root_is_volatile_and_per_storage(tmp_path: Path) -> None:
    one = default_run_root(tmp_path / "a")
    assert one == default_run_root(tmp_path / "a")
    assert one != default_run_root(tmp_path / "b")

"""ListBuilds pages: every build exactly once, a capped page size, a byte budget, trimming."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyarch.coordinator.core.manager import BuildManager
from polyarch.coordinator.core.model import BuildSpec, InvalidRequest
from polyarch.coordinator.limits import Limits
from polyarch.coordinator.wire import listing
from polyarch.proto.v1 import build_pb2
from tests.support.simulated import DIGEST, Clock, connect, started_manager


async def farm(tmp_path: Path, builds: int, limits: Limits = Limits()) -> BuildManager:  # noqa: B008
    clock = Clock()
    manager = await started_manager(tmp_path, clock=clock, limits=limits)
    # builds need an agent that can take them; one slot keeps most of them queued
    connect(manager, "s390x", ["linux/s390x"], slots=1)
    for i in range(builds):
        clock.now += 1.0 if i % 3 == 0 else 0.0  # several builds share each created_at
        spec = BuildSpec(DIGEST, "Dockerfile", ["linux/s390x"], [f"127.0.0.1:5000/a/b:{i}"])
        await manager.submit(spec, "")
    await manager.settle()
    return manager


async def page(manager: BuildManager, **fields: object) -> build_pb2.ListBuildsResponse:
    request = build_pb2.ListBuildsRequest(**fields)  # type: ignore[arg-type]
    return await listing.list_page(manager.list_page, request, manager.limits)


async def test_pages_of_ten_over_25_builds_hold_each_exactly_once_newest_first(
    tmp_path: Path,
) -> None:
    manager = await farm(tmp_path, 25)
    seen: list[build_pb2.Build] = []
    token, sizes = "", []
    while True:
        response = await page(manager, page_size=10, page_token=token)
        sizes.append(len(response.builds))
        seen += response.builds
        token = response.next_page_token
        if not token:
            break
    assert sizes == [10, 10, 5]
    assert len({b.id for b in seen}) == 25
    # newest first; builds submitted at one instant in id order
    order = [(b.created_at.ToNanoseconds(), b.id) for b in seen]
    assert order == sorted(order, reverse=True)


async def test_the_old_limit_still_sets_the_page_size_and_no_more_pages_means_no_token(
    tmp_path: Path,
) -> None:
    manager = await farm(tmp_path, 3)
    assert len((await page(manager, limit=2)).builds) == 2
    whole = await page(manager, limit=3)
    assert len(whole.builds) == 3 and whole.next_page_token == ""
    assert len((await page(manager)).builds) == 3  # the default page


async def test_a_page_size_is_capped_at_max_list_page(tmp_path: Path) -> None:
    manager = await farm(tmp_path, 12, Limits(max_list_page=5))
    response = await page(manager, page_size=1000)
    assert len(response.builds) == 5 and response.next_page_token


@pytest.mark.parametrize("token", ["%%%", "bm90IGpzb24", "WzEsMl0"])
async def test_a_malformed_page_token_is_refused(tmp_path: Path, token: str) -> None:
    with pytest.raises(InvalidRequest, match="malformed page_token"):
        await page(await farm(tmp_path, 1), page_token=token)


async def test_a_page_stops_at_its_byte_budget_and_the_next_page_goes_on_from_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = await farm(tmp_path, 9)
    one = (await page(manager, page_size=1)).builds[0].ByteSize()
    monkeypatch.setattr(listing, "RESPONSE_BUDGET_BYTES", 3 * one + 30)
    first = await page(manager, page_size=9)
    assert len(first.builds) == 3 and first.next_page_token
    rest = await page(manager, page_size=9, page_token=first.next_page_token)
    assert len({b.id for b in [*first.builds, *rest.builds]}) == 3 + len(rest.builds)
    assert sum(b.ByteSize() for b in first.builds) <= listing.RESPONSE_BUDGET_BYTES


def test_long_free_text_is_trimmed_in_a_listing() -> None:
    build = build_pb2.Build(
        error="e" * 100_000,
        jobs=[build_pb2.Job(error="x" * 10_000, requeue_reasons=["r" * 5000] * 20)],
    )
    listed = listing.trimmed(build)
    assert len(listed.error) < listing.LISTED_TEXT_BYTES + 100
    assert listed.error.endswith("[97952 more bytes; GetBuild has all]")
    assert len(listed.jobs[0].requeue_reasons) == listing.LISTED_REQUEUE_REASONS
    assert listed.ByteSize() < 40_000

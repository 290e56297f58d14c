"""Log text is bounded in bytes: per line, per job, and per watcher that does not read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from polyarch.coordinator.core.events import LINE_OVERHEAD_BYTES, MAX_LINE_BYTES, clip_line
from polyarch.coordinator.core.manager import BuildManager
from polyarch.coordinator.core.model import BuildSpec, LimitExceeded
from polyarch.coordinator.limits import KIB, MIB, Limits
from tests.support.simulated import DIGEST, assignments, connect, started_manager

LIMITS = Limits(max_log_bytes_per_job=256 * KIB, max_watcher_backlog_bytes=512 * KIB)


@dataclass(frozen=True)
class Running:
    agent: str
    job_id: str
    attempt: int


async def running_job(tmp_path: Path) -> tuple[BuildManager, str, Running]:
    """A manager with one simulated agent running the one job of one build."""
    manager = await started_manager(tmp_path, limits=LIMITS)
    session = connect(manager, "amd", ["linux/amd64"], slots=1)
    build, _ = await manager.submit(
        BuildSpec(DIGEST, "Dockerfile", ["linux/amd64"], ["127.0.0.1:5000/a/b:1"]), ""
    )
    (assign,) = await assignments(manager, session)
    job = Running("amd", assign.job_id, assign.attempt)
    manager.job_started(job.agent, job.job_id, job.attempt)
    return manager, build.id, job


def log(manager: BuildManager, job: Running, lines: list[str]) -> None:
    manager.job_log(job.agent, job.job_id, job.attempt, lines)


def test_a_long_line_is_cut_with_a_marker_naming_what_was_cut() -> None:
    assert clip_line("short") == "short"
    clipped = clip_line("é" * MIB)  # two bytes each: the cut never splits a character
    assert clipped.startswith("é" * (MAX_LINE_BYTES // 2))
    assert clipped.endswith(f" [polyarch: line truncated, {2 * MIB - MAX_LINE_BYTES} more bytes]")


async def test_a_job_keeps_at_most_its_log_budget_and_says_how_much_it_dropped(
    tmp_path: Path,
) -> None:
    manager, _, event = await running_job(tmp_path)
    for i in range(200):  # 200 one-MiB lines, as in the attack
        log(manager, event, [f"{i:04d}" + "x" * MIB])
    kept_bytes = manager.hub.tail_bytes(event.job_id)
    assert kept_bytes <= LIMITS.max_log_bytes_per_job
    tail = manager.hub.log_tail(event.job_id, 10_000)
    marker, lines = tail[0], tail[1:]
    per_line = MAX_LINE_BYTES + len(" [polyarch: line truncated, 1032180 more bytes]")
    assert len(lines) == LIMITS.max_log_bytes_per_job // (per_line + LINE_OVERHEAD_BYTES)
    assert lines[-1].line.startswith("0199")  # the newest are kept
    dropped = (200 - len(lines)) * per_line
    assert marker.line == (
        f"[polyarch: {dropped} bytes of earlier log dropped (max_log_bytes_per_job)]"
    )
    assert manager.hub.log_tail(event.job_id, 3)[0].line.startswith("0197")  # no marker


async def test_many_empty_lines_are_charged_for_their_count(tmp_path: Path) -> None:
    manager, _, event = await running_job(tmp_path)
    log(manager, event, [""] * 100_000)
    assert len(manager.hub.log_tail(event.job_id, 1_000_000)) <= (
        LIMITS.max_log_bytes_per_job // LINE_OVERHEAD_BYTES
    )


async def test_a_watcher_that_never_reads_is_cut_off_at_its_backlog_limit(tmp_path: Path) -> None:
    manager, build_id, event = await running_job(tmp_path)
    hub = manager.hub
    slow = manager.watch(build_id, 0)
    await anext(slow)  # the snapshot: subscribed, then never read again
    (slow_watcher,) = hub._subscribers[build_id]
    reader = manager.watch(build_id, 0)
    await anext(reader)
    (reader_watcher,) = hub._subscribers[build_id] - {slow_watcher}
    read = 0
    for i in range(100):
        log(manager, event, [f"{i}" + "y" * 20 * KIB])
        while reader_watcher.pending:
            await asyncio.wait_for(anext(reader), 5)
            read += 1
        assert slow_watcher.backlog_bytes <= LIMITS.max_watcher_backlog_bytes
    assert read == 100  # the watcher that reads gets every line
    assert hub._subscribers[build_id] == {reader_watcher}
    with pytest.raises(LimitExceeded) as caught:
        await asyncio.wait_for(anext(slow), 5)
    message = str(caught.value)
    assert "bytes (max_watcher_backlog_bytes)" in message and "watch again" in message
    assert f"the limit is {LIMITS.max_watcher_backlog_bytes} bytes" in message
    assert slow_watcher.backlog_bytes == reader_watcher.backlog_bytes == 0
    await cast(AsyncGenerator[Any, None], reader).aclose()

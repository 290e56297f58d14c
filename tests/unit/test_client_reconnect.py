"""The client outlives a coordinator outage: watches re-attach and submits are repeated."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from polyarch.client.api import BuildClient, CoordinatorUnreachable
from polyarch.client.credentials import Credentials
from polyarch.coordinator.server import Coordinator, CoordinatorConfig
from tests.support.services import free_port

OUTAGE = 7.0  # longer than the ~5 s after which a watch used to fail with "Channel is closed"


def config(data_dir: Path, port: int) -> CoordinatorConfig:
    return CoordinatorConfig(
        listen=f"127.0.0.1:{port}", data_dir=data_dir, metrics_listen="", insecure=True
    )


async def test_an_operation_is_repeated_until_the_coordinator_is_back(tmp_path: Path) -> None:
    port = free_port()
    first = Coordinator(config(tmp_path / "data", port))
    await first.start()
    lost: list[str] = []
    async with BuildClient(
        f"127.0.0.1:{port}", credentials=Credentials(insecure=True), connect_timeout=2.0
    ) as client:
        assert await client.list_builds() == []
        await first.stop(grace=0)
        calls = 0

        async def list_builds() -> int:
            nonlocal calls
            calls += 1
            return len(await client.list_builds())

        async def come_back() -> Coordinator:
            await asyncio.sleep(OUTAGE)  # the outage itself, not a wait for a condition
            second = Coordinator(config(tmp_path / "data", port))
            await second.start()
            return second

        returning = asyncio.create_task(come_back())
        try:
            assert await client.retrying(list_builds, on_lost=lost.append) == 0
        finally:
            second = await returning
        await second.stop(grace=0)
    assert calls >= 2
    assert len(lost) == 1 and "lost the coordinator" in lost[0]  # said once, not per attempt


async def test_the_window_bounds_the_wait(tmp_path: Path) -> None:
    port = free_port()
    coordinator = Coordinator(config(tmp_path / "data", port))
    await coordinator.start()
    async with BuildClient(
        f"127.0.0.1:{port}", credentials=Credentials(insecure=True), connect_timeout=1.0
    ) as client:
        await coordinator.stop(grace=0)
        with pytest.raises(CoordinatorUnreachable):
            await client.retrying(client.list_builds, reconnect_window=2.0)

"""Fixtures the integration tests share: an in-process farm."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.farm import Farm, running_farm


@pytest.fixture
async def farm(tmp_path: Path) -> AsyncIterator[Farm]:
    """A coordinator (TLS and tokens, as deployed) with no agent yet: tests add their own."""
    async with running_farm(tmp_path / "farm") as running:
        yield running

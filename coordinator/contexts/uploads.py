"""Bounds on context uploads in flight: how many at once (overall, per caller) and for how long."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import TypeVar

from polyarch.coordinator.core.model import LimitExceeded
from polyarch.coordinator.limits import Limits

T = TypeVar("T")


class UploadSlots:
    """Counts uploads in flight; a claim over a cap is refused at once, before any file opens.

    Every upload holds a temp file (one descriptor) for its whole life, so these caps
    are what keeps stalled uploads from exhausting the coordinator's descriptors.
    """

    def __init__(self, limits: Limits) -> None:
        self.total_cap = limits.max_concurrent_uploads
        self.caller_cap = limits.max_concurrent_uploads_per_caller
        self._by_caller: Counter[str] = Counter()
        self.in_flight = 0

    @contextlib.contextmanager
    def claim(self, caller: str) -> Iterator[None]:
        """Holds one slot for `caller` (a token id; "" is one caller too) while the body runs.

        No lock: the coordinator runs on one event loop and nothing here awaits.
        """
        if self.in_flight >= self.total_cap:
            raise LimitExceeded(
                f"{self.in_flight} context uploads are in flight on the coordinator: "
                f"over the limit max_concurrent_uploads={self.total_cap}; retry later"
            )
        if self._by_caller[caller] >= self.caller_cap:
            raise LimitExceeded(
                f"this token has {self._by_caller[caller]} context uploads in flight: over the "
                f"limit max_concurrent_uploads_per_caller={self.caller_cap}; retry later"
            )
        self.in_flight += 1
        self._by_caller[caller] += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._by_caller[caller] -= 1
            if self._by_caller[caller] <= 0:
                del self._by_caller[caller]

    def of(self, caller: str) -> int:
        return self._by_caller[caller]


async def timed(
    items: AsyncIterator[T],
    idle_seconds: float,
    deadline_seconds: float,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[T, None]:
    """`items`, refused with LimitExceeded once more than `idle_seconds` pass waiting for the
    next one (the first included), or `deadline_seconds` since this generator started.

    Only the waits for the sender are timed: the coordinator's own disk writes are not the
    sender's fault, and cancelling a write running in a thread would not stop it anyway.
    """
    deadline = clock() + deadline_seconds
    while True:
        remaining = deadline - clock()
        wait = min(idle_seconds, remaining)
        try:
            if wait <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait):
                item = await anext(items)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if remaining <= idle_seconds:
                raise LimitExceeded(
                    f"the upload did not finish within {deadline_seconds:g} s: over the limit "
                    f"upload_deadline_seconds={deadline_seconds:g}"
                ) from None
            raise LimitExceeded(
                f"no upload chunk arrived for {idle_seconds:g} s: over the limit "
                f"upload_idle_seconds={idle_seconds:g}"
            ) from None
        yield item


@contextlib.asynccontextmanager
async def bounded_upload(
    slots: UploadSlots, limits: Limits, caller: str, messages: AsyncIterator[T]
) -> AsyncIterator[AsyncGenerator[T, None]]:
    """One upload stream under every bound: a slot of `caller`'s, claimed before the first
    message is awaited (a caller over its cap is refused at once), and the idle and deadline
    limits on the wait for each message, the first included."""
    with slots.claim(caller):
        timed_messages = timed(messages, limits.upload_idle_seconds, limits.upload_deadline_seconds)
        async with contextlib.aclosing(timed_messages) as bounded:
            yield bounded

"""Deadline polling for tests: wait for a condition instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_INTERVAL = 0.05


class PollTimeout(AssertionError, TimeoutError):
    """A polled condition did not hold before its deadline.

    Both an AssertionError (pytest reports it as a test failure, with the message)
    and a TimeoutError (callers may catch it like any other timeout).
    """


def _timeout_error(
    message: str, timeout: float, last: object, error: BaseException | None
) -> PollTimeout:
    detail = f"{message} (not true after {timeout:g}s; last value: {last!r}"
    if error is not None:
        detail += f"; last error: {type(error).__name__}: {error}"
    return PollTimeout(detail + ")")


async def poll_until(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    interval: float = DEFAULT_INTERVAL,
    message: str,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Calls predicate (sync or async) until it returns a truthy value, and returns that value.

    The predicate runs at least once, and once more at the deadline, so a slow
    event loop can't turn a true condition into a timeout. Exceptions of the
    types in `ignore` count as "not yet" (e.g. connection refused while a server
    starts); anything else propagates at once. Raises PollTimeout(message) when
    the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            last, error = result, None
            if result:
                return result
        except ignore as exc:
            error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(message, timeout, last, error)
        await asyncio.sleep(min(interval, remaining))


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float,
    interval: float = DEFAULT_INTERVAL,
    message: str,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Blocking twin of poll_until for sync tests and fixtures (the predicate must be sync)."""
    deadline = time.monotonic() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.iscoroutine(result):
                result.close()  # no "never awaited" warning on top of the real error
                raise TypeError("wait_until got an async predicate; use poll_until")
            last, error = result, None
            if result:
                return result
        except ignore as exc:
            error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(message, timeout, last, error)
        time.sleep(min(interval, remaining))

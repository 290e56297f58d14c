"""The scan gate: an operator's command run once per pushed platform image, before tags move."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

TAIL_LINES = 20
# what one scanner may print before its output is cut (the tail is what is kept)
_MAX_LINE = 4096


class ScanCommandError(ValueError):
    """A scan command template that cannot be run (empty, unbalanced quotes, no {ref})."""


class ScanFailed(Exception):
    """A scanner refused (non-zero exit, or timed out on) a platform's image."""


def scan_argv(template: str, ref: str) -> list[str]:
    """The template split as a shell would (shlex, no shell is run), with `{ref}` replaced in
    every word; the reference is one word whatever it contains."""
    words = parse_scan_command(template)
    return [word.replace("{ref}", ref) for word in words]


def parse_scan_command(template: str) -> list[str]:
    """The template's words; ScanCommandError when it cannot be a scan command."""
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise ScanCommandError(f"scan command {template!r}: {exc}") from None
    if not words:
        raise ScanCommandError("scan command is empty")
    if not any("{ref}" in word for word in words):
        raise ScanCommandError(f"scan command {template!r} has no {{ref}} for the image")
    return words


@dataclass(frozen=True)
class ScanResult:
    """One scanner run: the platform, the image reference, the exit status (None: timed
    out) and the last lines it printed (stdout and stderr together)."""

    platform: str
    ref: str
    status: int | None
    tail: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.status == 0

    @property
    def outcome(self) -> str:
        return "passed" if self.passed else "timeout" if self.status is None else "failed"

    def summary(self) -> str:
        how = "timed out" if self.status is None else f"exited {self.status}"
        last = " | ".join(self.tail[-5:]) or "no output"
        return f"{self.platform}: scanner {how} on {self.ref}: {last}"


async def run_scanner(
    template: str, platform: str, ref: str, timeout: float, env: dict[str, str] | None = None
) -> ScanResult:
    """Runs the scanner once and keeps the last TAIL_LINES lines of its output."""
    argv = scan_argv(template, ref)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        return ScanResult(platform, ref, 127, (f"cannot run {argv[0]}: {exc.strerror}",))
    assert proc.stdout is not None

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()[:_MAX_LINE]
            if text:
                tail.append(text)
        await proc.wait()

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        # its own session: the scanner's children go with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        return ScanResult(platform, ref, None, (*tail, f"killed after {timeout:g} s"))
    return ScanResult(platform, ref, proc.returncode, tuple(tail))


class Scanner:
    """Runs the scan command on every platform image of a build, at most `concurrency` at a
    time, and counts outcomes through `count(outcome)`."""

    def __init__(
        self, timeout: float = 600.0, concurrency: int = 4,
        count: Callable[[str], None] = lambda _outcome: None,
    ) -> None:  # fmt: skip
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._count = count

    async def scan(self, template: str, images: dict[str, str]) -> list[ScanResult]:
        """Scans each platform's image reference (platform -> reference), all of them."""

        async def one(platform: str, ref: str) -> ScanResult:
            async with self._slots:
                result = await run_scanner(template, platform, ref, self.timeout)
            self._count(result.outcome)
            log.info("scan %s: %s (%s)", result.outcome, ref, platform)
            return result

        return list(await asyncio.gather(*(one(p, r) for p, r in images.items())))

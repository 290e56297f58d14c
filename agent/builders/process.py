"""Running builder tools as process groups: streamed output lines and a bounded kill on cancel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# How long a process group gets between SIGTERM and SIGKILL, and after SIGKILL to be reaped.
TERMINATE_GRACE_SECONDS = 3.0
KILL_WAIT_SECONDS = 3.0
# Output kept for failure analysis; everything is streamed to on_line regardless.
TAIL_LINES = 2000
_CHUNK = 65536


@dataclass(frozen=True)
class ProcessResult:
    """How a finished process ended and the last lines it printed (stdout and stderr merged)."""

    argv: tuple[str, ...]
    returncode: int
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, count: int = 20) -> str:
        """The last non-empty lines, joined, for error messages."""
        useful = [line for line in self.lines if line.strip()]
        return "\n".join(useful[-count:])


class ProcessNotFound(Exception):
    """The program to run does not exist or is not executable."""

    def __init__(self, program: str, reason: str) -> None:
        super().__init__(f"{program}: {reason}")
        self.program = program
        self.reason = reason


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")


async def _pump(
    stream: asyncio.StreamReader, on_line: Callable[[str], None], keep: deque[str]
) -> None:
    """Splits the stream into lines by hand so an overlong line never trips a buffer limit."""
    pending = b""
    while True:
        chunk = await stream.read(_CHUNK)
        if not chunk:
            break
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            line = _decode(raw)
            keep.append(line)
            on_line(line)
    if pending:
        line = _decode(pending)
        keep.append(line)
        on_line(line)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def terminate_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to the process's whole group, SIGKILL after a grace; returns once it is reaped."""
    pgid = process.pid  # start_new_session=True makes the child its group's leader
    _signal_group(pgid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), TERMINATE_GRACE_SECONDS)
    # Children may outlive a leader that exited on SIGTERM: kill what is left of the group.
    _signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), KILL_WAIT_SECONDS)


async def run_streaming(
    argv: Sequence[str],
    on_line: Callable[[str], None],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ProcessResult:
    """Runs argv in a new session, handing each output line to on_line as it is printed.

    Cancelling the awaiting task terminates the whole process group (bounded by
    TERMINATE_GRACE_SECONDS + KILL_WAIT_SECONDS) and re-raises CancelledError.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        raise ProcessNotFound(argv[0], exc.strerror or str(exc)) from exc
    if on_start is not None:
        on_start(process.pid)
    keep: deque[str] = deque(maxlen=TAIL_LINES)
    assert process.stdout is not None
    try:
        await _pump(process.stdout, on_line, keep)
        returncode = await process.wait()
    except BaseException:
        # Cancellation, or on_line raising: never leave the tool running behind us.
        await asyncio.shield(terminate_group(process))
        raise
    return ProcessResult(tuple(argv), returncode, tuple(keep))


async def run_captured(
    argv: Sequence[str], *, timeout: float = 30.0, env: Mapping[str, str] | None = None
) -> ProcessResult:
    """Runs a short command and collects its output; a timeout kills it and raises TimeoutError."""
    lines: list[str] = []
    return await asyncio.wait_for(run_streaming(argv, lines.append, env=env), timeout)

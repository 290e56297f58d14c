"""`--progress tty`: a live per-platform view redrawn in place with ANSI escapes, as buildx does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
import unicodedata
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TextIO

from polyarch.client.render import TERMINAL_BUILD_STATES, build_mode, build_state
from polyarch.proto.agent_protocol import PUSHING_MARKER
from polyarch.proto.v1 import build_pb2, common_pb2

REDRAW_INTERVAL = 0.1  # at most ~10 redraws a second, on events and on the timer
BAR_CELLS = 12
FAILED_LOG_LINES = 20  # a failed platform's last lines, printed in full under the summary
# The bar shows known phases, not a measured percentage (the builders report none):
# queued 0, assigned 1/12, building 2/12 rising to 9/12 with the Dockerfile step ([n/m],
# STEP n/m) the log last named, pushing 10/12, pushed 12/12.
ASSIGNED, BUILDING, BUILT, PUSHING = 1 / 12, 2 / 12, 9 / 12, 10 / 12
# BuildKit `#5 [stage 2/3] RUN ...`, buildah `STEP 2/3: RUN ...`
_STEP = re.compile(r"^(?:#\d+ \[(?:[^\]\s]+ )?(\d+)/(\d+)\]|STEP (\d+)/(\d+):)")
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")
_COLORS = {"done": "32", "failed": "31", "active": "36", "log": "2", "head": "1"}


def progress_mode(requested: str, out: TextIO) -> str:
    """`auto` is `tty` when `out` is a terminal that can move its cursor, else `plain` (buildx's
    rule); any other mode is itself."""
    if requested != "auto":
        return requested
    try:
        terminal = out.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        terminal = False
    return "tty" if terminal and os.environ.get("TERM") != "dumb" else "plain"


def terminal_width(out: TextIO) -> int:
    """Columns of the terminal `out` draws on ($COLUMNS first, as shutil reads it)."""
    if "COLUMNS" not in os.environ:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            return os.get_terminal_size(out.fileno()).columns or 80
    return shutil.get_terminal_size().columns


def terminal_rows(out: TextIO) -> int:
    if "LINES" not in os.environ:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            return os.get_terminal_size(out.fileno()).lines or 24
    return shutil.get_terminal_size().lines


def _cells(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def fit(text: str, cells: int) -> str:
    """`text` cut to at most `cells` terminal columns (wide characters take two)."""
    used = 0
    for index, char in enumerate(text):
        used += _cells(char)
        if used > cells:
            return text[:index]
    return text


def clean(line: str) -> str:
    """A builder line fit for one screen row: no escapes, no control characters, no tabs."""
    return _ESCAPE.sub("", line.rstrip("\r\n").rsplit("\r", 1)[-1]).expandtabs(4)


@dataclass
class PlatformView:
    """What the screen shows of one platform's job."""

    platform: str
    job: build_pb2.Job
    first_seen: float
    ended_at: float | None = None
    pushing: bool = False
    step: float = 0.0  # the highest Dockerfile step fraction its log named
    last: str = ""  # its last non-blank log line, cleaned for the screen
    log: deque[str] = field(default_factory=lambda: deque(maxlen=FAILED_LOG_LINES))

    def share(self) -> float:
        """The bar's filled share, by known phase (see BAR_CELLS' comment)."""
        state = self.job.state
        if state == common_pb2.JOB_STATE_PUSHED:
            return 1.0
        if state == common_pb2.JOB_STATE_QUEUED:
            return 0.0
        if state == common_pb2.JOB_STATE_ASSIGNED:
            return ASSIGNED
        if self.pushing:
            return PUSHING
        return BUILDING + (BUILT - BUILDING) * self.step  # running, or where it failed

    def state_text(self) -> tuple[str, str]:
        """(text, color key) for the state column."""
        job = self.job
        agent = f"{job.agent} {build_mode(job.mode)}".strip()
        if job.state == common_pb2.JOB_STATE_QUEUED:
            return (f"re-queued (attempt {job.attempt})" if job.attempt > 1 else "queued"), ""
        if job.state == common_pb2.JOB_STATE_ASSIGNED:
            return f"assigned to {agent}", "active"
        if job.state == common_pb2.JOB_STATE_RUNNING:
            return (f"pushing from {agent}" if self.pushing else f"building on {agent}"), "active"
        if job.state == common_pb2.JOB_STATE_PUSHED:
            return f"done {job.digest[:19]}", "done"  # sha256: and 12 hex, as docker shortens
        if job.state == common_pb2.JOB_STATE_FAILED:
            return "failed" + (f' at "{job.failed_step}"' if job.failed_step else ""), "failed"
        if job.state == common_pb2.JOB_STATE_CANCELLED:
            return "cancelled", "failed"
        return "unknown", ""


class TtyRenderer:
    """Redraws a header and one line per platform in place (cursor up, erase line); when the
    build ends it leaves that screen as a static summary and prints each failed platform's
    last log lines in full, so a CI log still shows the cause."""

    def __init__(
        self,
        out: TextIO,
        *,
        width: Callable[[], int] | None = None,
        rows: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        color: bool | None = None,
    ) -> None:
        self.out = out
        self._width = width or (lambda: terminal_width(out))
        self._rows = rows or (lambda: terminal_rows(out))
        self._clock = clock
        self.color = not os.environ.get("NO_COLOR") if color is None else color  # no-color.org
        self.build: build_pb2.Build | None = None
        self.platforms: dict[str, PlatformView] = {}  # by platform, in the build's order
        self._started = clock()
        self._ended_at: float | None = None
        self._drawn = 0  # screen lines the last frame took (the cursor sits below them)
        self._last_frame: list[str] = []
        self._last_draw = float("-inf")
        self._done = False

    # -- events --------------------------------------------------------------------------

    def handle(self, event: build_pb2.BuildEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "build":
            self.build = event.build
            for job in event.build.jobs:
                self._on_job(job)
            if event.build.state in TERMINAL_BUILD_STATES:
                self.finish()
                return
        elif kind == "job":
            self._on_job(event.job)
        elif kind == "log":
            self._on_log(event.log)
        self.refresh()

    def _on_job(self, job: build_pb2.Job) -> None:
        view = self.platforms.get(job.platform)
        now = self._clock()
        if view is None:
            view = self.platforms[job.platform] = PlatformView(job.platform, job, now)
        elif job.attempt != view.job.attempt:  # re-queued: a new attempt starts from zero
            view.pushing, view.step, view.ended_at, view.last = False, 0.0, None, ""
            view.log.clear()
        view.job = job
        terminal = job.state in (
            common_pb2.JOB_STATE_PUSHED,
            common_pb2.JOB_STATE_FAILED,
            common_pb2.JOB_STATE_CANCELLED,
        )
        if terminal and view.ended_at is None:
            view.ended_at = now

    def _on_log(self, log: build_pb2.LogLine) -> None:
        view = self.platforms.get(log.platform)
        if view is None or (log.attempt and log.attempt < view.job.attempt):
            return  # a line of an attempt that was re-queued since
        line = log.line.rstrip("\r\n")
        view.log.append(line)
        text = clean(line)
        view.last = text if text.strip() else view.last
        if text.startswith(PUSHING_MARKER) or text.startswith("The push refers to repository"):
            view.pushing = True
        elif (match := _STEP.match(text)) is not None:
            done, total = (int(n) for n in (match[1] or match[3], match[2] or match[4]))
            if total:  # a step starts: the steps before it are done
                view.step = max(view.step, min(1.0, (done - 1) / total))

    def note(self, message: str) -> None:
        """A message (a lost coordinator, say) printed above the live view."""
        self._erase()
        print(message, file=self.out, flush=True)
        self.refresh(force=True)

    # -- drawing -------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Redraws the live view, at most once per REDRAW_INTERVAL unless forced."""
        now = self._clock()
        if self._done or (not force and now - self._last_draw < REDRAW_INTERVAL):
            return
        self._last_draw = now
        frame = self.frame(now, limit=max(3, self._rows() - 1))
        if frame != self._last_frame or force:
            self._draw(frame)

    def finish(self) -> None:
        """Leaves the final screen (every platform) and the failed platforms' last log lines."""
        if self._done:
            return
        now = self._clock()
        self._ended_at = self._ended_at or now
        self._draw(self.frame(now, limit=None))
        self._done, self._drawn = True, 0
        build = self.build
        if build is not None and build.state == common_pb2.BUILD_STATE_SUCCEEDED:
            print(f"build {build.id} succeeded: {build.index_digest}", file=self.out)
        failed = [v for v in self.platforms.values() if v.job.state == common_pb2.JOB_STATE_FAILED]
        for view in failed:
            print(self._paint(f"--- {view.platform}: last log lines ---", "failed"),
                  file=self.out)  # fmt: skip
            for line in view.log:
                print(f"[{view.platform}] {line}", file=self.out)
        self.out.flush()

    def close(self) -> None:
        """Stops redrawing, leaving the last screen where it is (build ended or interrupted)."""
        if not self._done:
            self.refresh(force=True)
            self._done, self._drawn = True, 0

    @contextlib.asynccontextmanager
    async def live(self) -> AsyncIterator[TtyRenderer]:
        """Redraws on a timer (the elapsed times move) while the body follows the build."""

        async def tick() -> None:
            while True:
                await asyncio.sleep(REDRAW_INTERVAL)
                self.refresh()

        ticker = asyncio.create_task(tick(), name="tty-progress")
        try:
            yield self
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self.close()

    def frame(self, now: float, limit: int | None) -> list[str]:
        """The screen's lines: a header, then a line per platform (at most `limit` lines)."""
        width = max(20, self._width()) - 1  # never the last column: no terminal wraps a line
        views = list(self.platforms.values())
        states = [v.state_text() for v in views]
        platform_cells = max((len(v.platform) for v in views), default=0)
        state_cells = max((len(text) for text, _ in states), default=0)
        lines = [self._line([(self._header(now), "head")], width)]
        for view, (state, tone) in zip(views, states, strict=True):
            filled = round(view.share() * BAR_CELLS)
            elapsed = (view.ended_at or now) - view.first_seen
            bar_tone = tone if tone in ("done", "failed") else "active"
            segments = [
                (f" {view.platform.ljust(platform_cells)} [", ""),
                ("#" * filled, bar_tone),
                ("-" * (BAR_CELLS - filled) + "] ", ""),
                (f"{elapsed:6.1f}s  ", ""),
                (state.ljust(state_cells), tone),
                (f"  {view.last}" if view.last else "", "log"),
            ]
            lines.append(self._line(segments, width))
        if limit is not None and len(lines) > limit:
            hidden = len(lines) - limit + 1
            lines = [
                *lines[: limit - 1],
                self._line([(f" ... {hidden} more platforms", "")], width),
            ]
        return lines

    def _header(self, now: float) -> str:
        elapsed = (self._ended_at or now) - self._started
        build = self.build
        if build is None:
            return f"[+] waiting for the build {elapsed:.1f}s"
        done = sum(v.job.state == common_pb2.JOB_STATE_PUSHED for v in self.platforms.values())
        head = f"[+] build {build.id} {elapsed:.1f}s ({done}/{len(self.platforms)} platforms done)"
        if build.state == common_pb2.BUILD_STATE_ASSEMBLING:
            return f"{head} assembling the image index"
        if build.state in (common_pb2.BUILD_STATE_FAILED, common_pb2.BUILD_STATE_CANCELLED):
            return f"{head} {build_state(build.state)}: {build.error or 'a platform failed'}"
        return f"{head} {build_state(build.state)}"

    def _paint(self, text: str, tone: str) -> str:
        if not self.color or not tone or not text:
            return text
        return f"\x1b[{_COLORS[tone]}m{text}\x1b[0m"

    def _line(self, segments: list[tuple[str, str]], width: int) -> str:
        parts: list[str] = []
        room = width
        for text, tone in segments:
            cut = fit(text, room)
            room -= sum(_cells(c) for c in cut)
            parts.append(self._paint(cut, tone))
        return "".join(parts)

    def _erase(self) -> None:
        """Moves the cursor up over the live view and clears it."""
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}A\r\x1b[J")
            self._drawn = 0
            self._last_frame = []

    def _draw(self, frame: list[str]) -> None:
        up = f"\x1b[{self._drawn}A" if self._drawn else ""
        body = "".join(f"\r{line}\x1b[K\n" for line in frame)
        # lines left from a taller frame go; the cursor ends below the view
        self.out.write(f"{up}{body}\x1b[J")
        self.out.flush()
        self._drawn = len(frame)
        self._last_frame = frame

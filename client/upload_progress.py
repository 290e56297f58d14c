"""What the CLI says while a context goes up: one summary line, then a bar or periodic lines."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, TextIO

from polyarch.client.tty_render import fit, terminal_width

Mode = Literal["quiet", "plain", "tty"]
BAR_MIN_BYTES = 8 << 20  # smaller uploads end before a bar would tell anything
REDRAW_INTERVAL = 0.1  # at most 10 redraws a second
PLAIN_INTERVAL = 10.0  # plain progress: a line this often
BAR_CELLS = (10, 40)
_UNITS = ("kB", "MB", "GB", "TB")


def human_bytes(count: float) -> str:
    """Decimal units, as docker prints sizes: 512 B, 12.3 kB, 200.0 MB."""
    if count < 1000:
        return f"{int(count)} B"
    for unit in _UNITS:
        count /= 1000
        if count < 999.95 or unit == _UNITS[-1]:
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def summary_line(files: int, total_bytes: int, send_files: int, send_bytes: int) -> str:
    """`context: 12,345 files, 200.0 MB; sending 1 file, 1.0 MB`."""
    return (
        f"context: {plural(files, 'file')}, {human_bytes(total_bytes)}; "
        f"sending {plural(send_files, 'file')}, {human_bytes(send_bytes)}"
    )


def render_bar(sent: int, total: int, rate: float, width: int) -> str:
    """One screen line: `context [#####-----] 45.0 MB / 100.0 MB  120.3 MB/s`, within
    `width` columns (the last one left free, so no terminal wraps it). The bar is full
    only when everything is sent."""
    share = min(1.0, sent / total) if total > 0 else 1.0
    tail = f" {human_bytes(sent)} / {human_bytes(total)}  {human_bytes(rate)}/s"
    low, high = BAR_CELLS
    cells = max(low, min(high, width - 1 - len("context []") - len(tail)))
    filled = int(share * cells)
    return fit(f"context [{'#' * filled}{'-' * (cells - filled)}]{tail}", max(1, width - 1))


class UploadProgress:
    """Reports one context upload on `out`: quiet says nothing; plain a line every
    PLAIN_INTERVAL seconds (and a last one for a big upload); tty a live bar for uploads
    over BAR_MIN_BYTES, redrawn in place at most 10 times a second, left in its final state.
    """

    def __init__(
        self,
        out: TextIO,
        mode: Mode,
        *,
        clock: Callable[[], float] = time.monotonic,
        width: Callable[[], int] | None = None,
    ) -> None:
        self.out = out
        self.mode = mode
        self._clock = clock
        self._width = width or (lambda: terminal_width(out))
        self.total = 0
        self.sent = 0
        self._base = 0  # sent before this run (a resumed upload): not in the rate
        self._started = 0.0
        self._last = float("-inf")
        self._drawn = False

    def note(self, line: str) -> None:
        """A line of its own (the summary, a resume), unless quiet; a bar drawn stays above."""
        if self.mode != "quiet":
            if self._drawn:
                self.out.write("\n")
                self._drawn = False
            self.out.write(line + "\n")
            self.out.flush()

    def start(self, total: int, already: int = 0) -> None:
        """`total` bytes to send, `already` of them verified by the coordinator before."""
        self.total, self.sent, self._base = total, already, already
        self._started = self._last = self._clock()

    def update(self, sent: int) -> None:
        """The bytes sent so far (a retry may move it back to what the coordinator kept)."""
        self.sent = sent
        now = self._clock()
        if self.mode == "tty" and self.total > BAR_MIN_BYTES:
            if now - self._last >= REDRAW_INTERVAL:
                self._last = now
                self._draw(now)
        elif self.mode == "plain" and now - self._last >= PLAIN_INTERVAL:
            self._last = now
            self.note(f"context: sent {human_bytes(sent)} of {human_bytes(self.total)}")

    def advance(self, count: int) -> None:
        self.update(self.sent + count)

    def rate(self, now: float) -> float:
        elapsed = now - self._started
        return (self.sent - self._base) / elapsed if elapsed > 0 else 0.0

    def finish(self) -> None:
        """Leaves the final bar (tty) or says what was sent (plain), for a big upload."""
        if self.total <= BAR_MIN_BYTES or self.mode == "quiet":
            return
        now = self._clock()
        self.sent = max(self.sent, self.total)
        if self.mode == "tty":
            self._draw(now)
            self.out.write("\n")
            self.out.flush()
            self._drawn = False
        else:
            self.note(f"context: sent {human_bytes(self.sent - self._base)} in "
                      f"{now - self._started:.1f} s ({human_bytes(self.rate(now))}/s)")  # fmt: skip

    def abandon(self) -> None:
        """The upload failed: a bar drawn so far stays, and what follows starts a line."""
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False

    def _draw(self, now: float) -> None:
        line = render_bar(self.sent, self.total, self.rate(now), self._width())
        self.out.write(f"\r{line}\x1b[K")
        self.out.flush()
        self._drawn = True

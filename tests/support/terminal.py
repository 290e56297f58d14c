"""A tiny terminal emulator for tests: plays text with ANSI cursor moves, returns the screen."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\r|\n|\x1b")
SGR = re.compile(r"\x1b\[[0-9;]*m")


class Screen:
    """Rows of text (SGR colours dropped) after playing a stream: CR, LF, cursor up (CSI n A),
    erase to end of line (CSI K), erase to end of screen (CSI J). `widest` is the longest
    row ever written; anything else raises, so a renderer's stray escape fails the test."""

    def __init__(self) -> None:
        self.rows: list[str] = [""]
        self.row = 0
        self.col = 0
        self.widest = 0

    def feed(self, text: str) -> Screen:
        at = 0
        for match in _CONTROL.finditer(text):
            self._put(text[at : match.start()])
            at = match.end()
            token = match[0]
            if token == "\r":
                self.col = 0
            elif token == "\n":
                self.row, self.col = self.row + 1, 0
                if self.row == len(self.rows):
                    self.rows.append("")
            elif match[2] == "A":
                self.row = max(0, self.row - int(match[1] or 1))
            elif match[2] == "K":
                self.rows[self.row] = self.rows[self.row][: self.col]
            elif match[2] == "J":
                self.rows[self.row] = self.rows[self.row][: self.col]
                del self.rows[self.row + 1 :]
            elif match[2] == "m":
                pass
            else:
                raise ValueError(f"unexpected escape {token!r}")
        self._put(text[at:])
        return self

    def _put(self, text: str) -> None:
        if not text:
            return
        line = self.rows[self.row].ljust(self.col)
        self.rows[self.row] = line[: self.col] + text + line[self.col + len(text) :]
        self.col += len(text)
        self.widest = max(self.widest, len(self.rows[self.row]))

    @property
    def lines(self) -> list[str]:
        """The screen's rows, trailing empty rows dropped."""
        rows = list(self.rows)
        while rows and not rows[-1]:
            rows.pop()
        return rows


def play(text: str) -> list[str]:
    return Screen().feed(text).lines

"""Docker's .dockerignore semantics (moby patternmatcher), for packing build contexts."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Characters moby escapes: special in a regular expression, literal in a pattern.
_REGEX_SPECIAL = frozenset(".+()|{}$")
_UTF8_BOM = "\ufeff"


class DockerignoreError(ValueError):
    """A .dockerignore pattern that cannot be compiled."""


@dataclass(frozen=True)
class Pattern:
    """One cleaned pattern; `exclusion` is True for a `!` exception that re-includes."""

    text: str
    exclusion: bool
    regex: re.Pattern[str]
    # moby's "suffix match" shortcut for `**<literal>` patterns, kept for fidelity.
    suffix: str | None

    def matches(self, path: str) -> bool:
        """Whether the slash-separated relative path matches this pattern exactly."""
        if self.suffix is not None:
            if path.endswith(self.suffix):
                return True
            return self.suffix.startswith("/") and path == self.suffix[1:]
        return self.regex.match(path) is not None


def clean_pattern(raw: str) -> str:
    """filepath.Clean plus moby's stripping of a leading "/" (patterns are context-relative)."""
    cleaned = posixpath.normpath(raw)
    if cleaned.startswith("//"):  # normpath keeps a leading "//"; filepath.Clean does not
        cleaned = "/" + cleaned.lstrip("/")
    if len(cleaned) > 1 and cleaned.startswith("/"):
        cleaned = cleaned[1:]
    return cleaned


def _translate(pattern: str) -> tuple[str, bool]:
    """Pattern -> (regex source, has wildcards), following moby's Pattern.compile."""
    out = ["^"]
    wild = False
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            wild = True
            if i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":  # "**/" is treated as "**"
                    i += 1
                out.append(".*" if i >= n else "(.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            wild = True
            out.append("[^/]")
        elif ch == "\\":
            # Escapes the next character; a trailing backslash stays (as moby leaves it).
            out.append("\\" + pattern[i] if i < n else "\\")
            i += 1
        elif ch in "[]":
            wild = True
            out.append(ch)
        elif ch in _REGEX_SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch)
    out.append("$")
    return "".join(out), wild


def _compile_regex(text: str, line: str) -> re.Pattern[str]:
    try:
        return re.compile(_translate(text)[0])
    except re.error as exc:
        raise DockerignoreError(f"syntax error in pattern {line!r}: {exc}") from None


def compile_pattern(line: str) -> Pattern:
    """Compiles one .dockerignore line (already trimmed, not a comment)."""
    exclusion = line.startswith("!")
    body = line[1:].strip() if exclusion else line
    if not body:
        raise DockerignoreError(f'illegal exclusion pattern: "{line}"')
    text = clean_pattern(body)
    regex = _compile_regex(text, line)
    suffix = None
    if text.startswith("**") and len(text) > 2 and not _translate(text[2:])[1]:
        suffix = text[2:]
    return Pattern(text=text, exclusion=exclusion, regex=regex, suffix=suffix)


def parse_dockerignore(text: str) -> list[str]:
    """The patterns of a .dockerignore file, in order: comments and blank lines dropped."""
    patterns: list[str] = []
    for number, line in enumerate(text.splitlines()):
        if number == 0:
            line = line.removeprefix(_UTF8_BOM)
        if line.startswith("#"):
            continue
        line = line.strip()
        if line:
            patterns.append(line)
    return patterns


class PatternMatcher:
    """An ordered list of patterns; the last one that matches a path or a parent decides."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.patterns = [compile_pattern(line) for line in lines]
        self.has_exclusions = any(p.exclusion for p in self.patterns)

    @classmethod
    def from_file(cls, path: Path, extra: Iterable[str] = ()) -> PatternMatcher:
        """Reads a .dockerignore file (missing file: no patterns), then appends `extra`."""
        try:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
        except FileNotFoundError:
            text = ""
        try:
            return cls([*parse_dockerignore(text), *extra])
        except DockerignoreError as exc:
            raise DockerignoreError(f"{path}: {exc}") from None

    def excluded(self, path: str) -> bool:
        """Whether a slash-separated context path is ignored (moby MatchesOrParentMatches)."""
        path = posixpath.normpath(path)
        parent = posixpath.dirname(path)
        parents = parent.split("/") if parent else []
        matched = False
        for pattern in self.patterns:
            # Only patterns that could change the verdict need evaluating.
            if pattern.exclusion != matched:
                continue
            hit = pattern.matches(path)
            if not hit:
                hit = any(pattern.matches("/".join(parents[: i + 1])) for i in range(len(parents)))
            if hit:
                matched = not pattern.exclusion
        return matched

    def may_include_below(self, directory: str) -> bool:
        """Whether some `!` exception could re-include a path strictly below `directory`.

        Conservative: a True answer only costs walking the directory; a False
        answer lets the packer skip an excluded directory (e.g. node_modules) whole.
        """
        parts = posixpath.normpath(directory).split("/")
        for pattern in self.patterns:
            if not pattern.exclusion:
                continue
            components = pattern.text.split("/")
            if len(components) <= len(parts) and "**" not in pattern.text:
                continue
            for index, component in enumerate(components):
                if "**" in component or index >= len(parts):
                    return True
                if not _compile_regex(component, pattern.text).match(parts[index]):
                    break
        return False

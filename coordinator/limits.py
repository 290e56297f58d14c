"""The coordinator's limits: one dataclass of defaults a normal CI farm never reaches."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(|k|ki|kib|m|mi|mib|g|gi|gib|t|ti|tib)?b?$", re.I)
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": GIB * KIB}


@dataclass(frozen=True)
class Limits:
    """Every bound the coordinator enforces. Sizes in bytes, durations in seconds.

    Set with `polyarch coordinator --limit NAME=VALUE` (repeatable; sizes take KiB/MiB/GiB
    suffixes): e.g. `--limit max_context_bytes=20GiB`.
    """

    # contexts
    max_context_bytes: int = 8 * GIB  # a tar, or a manifest's files together (and each blob)
    # A manifest line is ~150-250 bytes and the coordinator decodes one into ~300 bytes of
    # memory, so these bound a decode to ~100 MB while allowing ~250k-file contexts (far more
    # than any context docker itself handles well).
    max_manifest_bytes: int = 64 * MIB
    max_context_entries: int = 250_000  # files, directories and symlinks of one manifest
    upload_deadline_seconds: float = 1800.0  # a whole upload
    upload_idle_seconds: float = 60.0  # between two chunks
    max_concurrent_uploads: int = 64
    max_concurrent_uploads_per_caller: int = 8
    context_gc_max_age_seconds: float = 7 * 86400.0  # unused contexts older than this go
    context_gc_max_total_bytes: int = 100 * GIB  # unused contexts beyond this go, oldest first
    # requests
    max_request_bytes: int = 4 * MIB  # any one gRPC message
    max_tags: int = 64
    max_platforms: int = 32
    max_build_args: int = 256
    max_labels: int = 256
    max_key_bytes: int = 256  # a build arg's or label's name
    max_value_bytes: int = 64 * KIB  # a build arg's or label's value
    max_args_and_labels_bytes: int = 1 * MIB  # all build args and labels of a build together
    max_path_bytes: int = 4 * KIB  # the dockerfile path, the target stage name
    max_list_page: int = 200  # builds per ListBuilds page
    # running builds
    job_timeout_seconds: float = 3 * 3600.0  # the coordinator's own bound on one attempt
    max_log_bytes_per_job: int = 4 * MIB  # kept for late watchers; older lines are dropped
    max_watcher_backlog_bytes: int = 16 * MIB  # a watcher further behind is cut off


class LimitSyntaxError(ValueError):
    """A --limit that names no limit or has a bad value; the message says which."""


def parse_size(text: str) -> int:
    """Bytes from `512`, `64KiB`, `8GiB`, `1.5g`."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise LimitSyntaxError(f"expected a size like 512MiB or 8GiB, got {text!r}")
    unit = (match[2] or "").lower()[:1]
    return int(float(match[1]) * _UNITS[unit])


def with_overrides(base: Limits, assignments: list[str]) -> Limits:
    """`base` with NAME=VALUE assignments applied (sizes for *_bytes*, seconds for *_seconds)."""
    fields = {f.name: f for f in dataclasses.fields(Limits)}
    changes: dict[str, float | int] = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            known = ", ".join(sorted(fields))
            raise LimitSyntaxError(f"unknown limit {name!r} (known: {known})")
        try:
            if "_bytes" in name:  # max_log_bytes_per_job is a size too
                changes[name] = parse_size(value)
            elif name.endswith("_seconds"):
                changes[name] = float(value)
            else:
                changes[name] = int(value)
        except ValueError as exc:
            raise LimitSyntaxError(f"--limit {name}: {exc}") from None
        if changes[name] <= 0:
            raise LimitSyntaxError(f"--limit {name} must be positive")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def clip_utf8(text: str, limit: int) -> tuple[str, int]:
    """The text cut to at most `limit` bytes of UTF-8 (never inside a character), and how
    many bytes were cut (0 when it fits)."""
    data = text.encode()
    if len(data) <= limit:
        return text, 0
    kept = data[:limit].decode(errors="ignore")
    return kept, len(data) - len(kept.encode())

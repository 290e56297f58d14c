"""A build context as a manifest of files: paths, modes, symlink targets and content digests.

The manifest is what an incremental context transfer sends first; its sha256 is the
context's digest, so builds, idempotency and provenance name a context by one digest
whether it went as a tar or as a manifest plus file blobs.

Encoding (canonical: one tree has exactly one encoding, and decode() refuses any other):
UTF-8 lines, each a JSON object with sorted keys, no spaces, ASCII only (non-UTF-8 file
names travel as surrogate escapes), ending in "\\n". The first line is the header
`{"format":"polyarch.context.manifest.v1"}`; then one line per entry, sorted by the
path's bytes, every parent directory listed before what it holds:

    {"mode":493,"mtime":1700000000,"path":"src","type":"dir"}
    {"digest":"sha256:…","mode":420,"mtime":1700000000,"path":"src/a.py","size":12,"type":"file"}
    {"mode":511,"mtime":1700000000,"path":"src/link","target":"a.py","type":"symlink"}

`mode` holds the permission bits (st_mode & 0o7777); `mtime` whole seconds, as the tar
path keeps them. The paths obey proto/context_paths.py, as a tar's members must.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from polyarch.proto.context_paths import PathRuleError, check_symlink, split_path

FORMAT = "polyarch.context.manifest.v1"
HEADER = b'{"format":"' + FORMAT.encode() + b'"}\n'
DEFAULT_MAX_ENTRIES = 1_000_000
DEFAULT_MAX_BYTES = 8 << 30  # the files' total size
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MTIME_BOUND = 1 << 53  # exact in JSON readers that parse numbers as doubles

Kind = Literal["dir", "file", "symlink"]
_KEYS: dict[str, frozenset[str]] = {
    "dir": frozenset({"path", "type", "mode", "mtime"}),
    "file": frozenset({"path", "type", "mode", "mtime", "size", "digest"}),
    "symlink": frozenset({"path", "type", "mode", "mtime", "target"}),
}


class ManifestError(ValueError):
    """A manifest that is malformed or breaks a rule; the message names the entry."""


def path_key(path: str) -> bytes:
    """The sort key of a manifest path: its file-system bytes (surrogate escapes undone)."""
    return path.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One file system object of a context: a directory, a regular file or a symlink."""

    path: str
    kind: Kind
    mode: int  # permission bits, st_mode & 0o7777
    mtime: int  # whole seconds
    size: int = 0  # files only
    digest: str = ""  # files only: "sha256:<hex>" of the content
    target: str = ""  # symlinks only, verbatim

    def as_json(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "path": self.path, "type": self.kind, "mode": self.mode, "mtime": self.mtime,
        }  # fmt: skip
        if self.kind == "file":
            fields["size"] = self.size
            fields["digest"] = self.digest
        elif self.kind == "symlink":
            fields["target"] = self.target
        return fields

    def encode(self) -> bytes:
        text = json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"))
        return text.encode("ascii") + b"\n"


@dataclass(frozen=True)
class ContextManifest:
    """A validated manifest; build with from_entries() (sorts) or decode() (checks order)."""

    entries: tuple[ManifestEntry, ...]
    _encoded: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def from_entries(
        cls,
        entries: Iterable[ManifestEntry],
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> ContextManifest:
        """Sorts and validates `entries` (the client's side)."""
        try:
            ordered = tuple(sorted(entries, key=lambda entry: path_key(entry.path)))
        except UnicodeEncodeError:
            raise ManifestError("a path holds a character no file name can") from None
        _validate(ordered, max_entries, max_bytes)
        return cls(ordered, HEADER + b"".join(entry.encode() for entry in ordered))

    @classmethod
    def decode(
        cls,
        data: bytes,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> ContextManifest:
        """Parses and validates a received manifest; refuses anything but the canonical form."""
        if not data.startswith(HEADER):
            raise ManifestError(f"is not a context manifest: the first line must be {HEADER!r}")
        if not data.endswith(b"\n"):
            raise ManifestError("does not end with a newline")
        lines = data[len(HEADER) :].split(b"\n")[:-1]
        if len(lines) > max_entries:
            raise ManifestError(f"has {len(lines)} entries, over the limit of {max_entries}")
        entries = tuple(_parse_line(number, line) for number, line in enumerate(lines, 2))
        _validate(entries, max_entries, max_bytes)
        return cls(entries, data)

    def encode(self) -> bytes:
        """The canonical bytes (kept from from_entries() or decode(), not made again)."""
        return self._encoded or HEADER + b"".join(entry.encode() for entry in self.entries)

    @cached_property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.encode()).hexdigest()

    @cached_property
    def blobs(self) -> dict[str, int]:
        """Every distinct file content: digest -> size, in manifest order."""
        return {e.digest: e.size for e in self.entries if e.kind == "file"}

    @property
    def total_bytes(self) -> int:
        """The files' total size, duplicates counted (what a tar of the tree would hold)."""
        return sum(entry.size for entry in self.entries if entry.kind == "file")

    @property
    def blob_bytes(self) -> int:
        """The distinct contents' total size (what a first upload sends)."""
        return sum(self.blobs.values())


def _parse_line(number: int, line: bytes) -> ManifestEntry:
    where = f"line {number}"
    try:
        raw = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{where} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} is not a JSON object")
    kind = raw.get("type")
    if kind not in _KEYS:
        raise ManifestError(f"{where}: type must be dir, file or symlink, not {kind!r}")
    if set(raw) != _KEYS[kind]:
        raise ManifestError(f"{where}: a {kind} has exactly the keys {sorted(_KEYS[kind])}")
    checks: list[tuple[str, type]] = [("path", str), ("mode", int), ("mtime", int)]
    checks += [("size", int), ("digest", str)] if kind == "file" else []
    checks += [("target", str)] if kind == "symlink" else []
    for key, expected in checks:
        if type(raw[key]) is not expected:  # not isinstance: True is an int there
            raise ManifestError(f"{where}: {key} must be a JSON {expected.__name__}")
    entry = ManifestEntry(
        path=raw["path"], kind=kind, mode=raw["mode"], mtime=raw["mtime"],
        size=raw.get("size", 0), digest=raw.get("digest", ""), target=raw.get("target", ""),
    )  # fmt: skip
    if entry.encode() != line + b"\n":
        raise ManifestError(f"{where} ({entry.path!r}) is not in canonical form")
    return entry


def _validate(entries: tuple[ManifestEntry, ...], max_entries: int, max_bytes: int) -> None:
    if len(entries) > max_entries:
        raise ManifestError(f"has {len(entries)} entries, over the limit of {max_entries}")
    kinds: dict[str, Kind] = {}
    sizes: dict[str, int] = {}
    total = 0
    previous = b""
    for entry in entries:
        name = entry.path
        try:
            parts = split_path(name)
            if "/".join(parts) != name or not parts:
                raise PathRuleError("is not a normal relative path (no '.', '//', ends in '/')")
            if entry.kind == "symlink":
                check_symlink(parts, entry.target)
            key = path_key(name)
        except PathRuleError as exc:
            raise ManifestError(f"entry {name!r} {exc}") from None
        except UnicodeEncodeError:
            raise ManifestError(f"entry {name!r} holds a character no file name can") from None
        if key <= previous and previous:
            what = "twice" if key == previous else "out of order"
            raise ManifestError(f"entry {name!r} is listed {what}; paths are sorted by bytes")
        previous = key
        parent = name.rpartition("/")[0]
        if parent and kinds.get(parent) != "dir":
            raise ManifestError(f"entry {name!r}: its parent {parent!r} is not a listed directory")
        if not 0 <= entry.mode <= 0o7777:
            raise ManifestError(f"entry {name!r}: mode {entry.mode} is not within 0..0o7777")
        if not -_MTIME_BOUND < entry.mtime < _MTIME_BOUND:
            raise ManifestError(f"entry {name!r}: mtime {entry.mtime} is out of range")
        if entry.kind == "file":
            if not _DIGEST.fullmatch(entry.digest):
                raise ManifestError(f"entry {name!r}: digest must be sha256: and 64 lowercase hex")
            if entry.size < 0:
                raise ManifestError(f"entry {name!r}: negative size {entry.size}")
            if sizes.setdefault(entry.digest, entry.size) != entry.size:
                raise ManifestError(
                    f"entry {name!r}: digest {entry.digest} is listed with two sizes"
                )
            total += entry.size
            if total > max_bytes:
                raise ManifestError(f"its files hold more than the limit of {max_bytes} bytes")
        elif entry.size or entry.digest:
            raise ManifestError(f"entry {name!r}: only files have a size and a digest")
        if entry.kind != "symlink" and entry.target:
            raise ManifestError(f"entry {name!r}: only symlinks have a target")
        kinds[name] = entry.kind

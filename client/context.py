"""Packs a build context into a deterministic tar file, honouring .dockerignore, and hashes it."""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from polyarch.client.dockerignore import DockerignoreError, PatternMatcher

# Where a Dockerfile from outside the context directory goes inside the tar.
RESERVED_DOCKERFILE = ".polyarch/Dockerfile"
_COPY_BUFFER = 1 << 20


class ContextError(Exception):
    """The build context or its Dockerfile cannot be packed; the message names the path."""


@dataclass(frozen=True)
class PackedContext:
    """A packed context on disk: the tar file, its digest and size, and the Dockerfile in it."""

    path: Path
    digest: str
    size: int
    # The Dockerfile's path inside the tar, to send as SubmitBuildRequest.dockerfile.
    dockerfile: str

    def discard(self) -> None:
        """Deletes the temporary tar file (idempotent)."""
        self.path.unlink(missing_ok=True)


class _HashingWriter:
    """A write-only file object that hashes and counts what it passes to the file below."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


@dataclass(frozen=True, slots=True)
class ContextEntry:
    """One file system object of the context: its name inside the context and where it is."""

    name: str
    source: str  # a path (str: a Path per file costs more than the walk's stat)
    mode: int  # st_mode: file type and permission bits
    mtime: int
    size: int
    # What a file hash cache compares (0 for made-up entries): a change to the content
    # changes at least one of them, with the size.
    mtime_ns: int = 0
    ctime_ns: int = 0
    inode: int = 0

    @classmethod
    def of(cls, name: str, source: str, info: os.stat_result) -> ContextEntry:
        return cls(
            name, source, info.st_mode, int(info.st_mtime), info.st_size,
            info.st_mtime_ns, info.st_ctime_ns, info.st_ino,
        )  # fmt: skip


@dataclass(frozen=True)
class ContextTree:
    """What a context holds, as the tar path packs it and a manifest describes it."""

    root: Path  # the context directory, resolved
    entries: list[ContextEntry]  # sorted by name
    # The Dockerfile's path inside the context, to send as SubmitBuildRequest.dockerfile.
    dockerfile: str
    dockerfile_source: Path  # where the Dockerfile is on disk (absolute)


def _resolve_dockerfile(context: Path, dockerfile: str | os.PathLike[str] | None) -> Path:
    """The Dockerfile's absolute path: `-f` is relative to the working directory, as in docker."""
    if dockerfile is None or str(dockerfile) == "":
        default = context / "Dockerfile"
        lower = context / "dockerfile"
        if not default.exists() and lower.exists():
            return lower
        path = default
    else:
        path = Path(dockerfile).absolute()
    if not path.exists():
        raise ContextError(f"Dockerfile not found: {path}")
    if not path.is_file():
        raise ContextError(f"Dockerfile is not a regular file: {path}")
    return path


def _dockerfile_in_context(context: Path, dockerfile: Path) -> str | None:
    """The Dockerfile's slash path relative to the context, or None when it is outside it."""
    try:
        relative = dockerfile.resolve().relative_to(context)
    except ValueError:
        return None
    return relative.as_posix()


def _ignore_file(context: Path, dockerfile: Path) -> Path:
    """buildx's rule: <Dockerfile>.dockerignore beside the Dockerfile wins over .dockerignore."""
    specific = dockerfile.with_name(dockerfile.name + ".dockerignore")
    return specific if specific.is_file() else context / ".dockerignore"


def _walk(context: Path, matcher: PatternMatcher) -> list[ContextEntry]:
    """Every object of the context that is not ignored, parents of re-included paths added."""
    entries: dict[str, ContextEntry] = {}
    # Excluded directories we descended into because an exception may re-include below them.
    excluded_dirs: dict[str, ContextEntry] = {}

    def add_parents(name: str) -> None:
        parent = name.rpartition("/")[0]
        while parent and parent not in entries and parent in excluded_dirs:
            entries[parent] = excluded_dirs[parent]
            parent = parent.rpartition("/")[0]

    def visit(directory: str, prefix: str) -> None:
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise ContextError(f"cannot read directory {directory}: {exc.strerror}") from None
        for child in children:
            name = prefix + child.name
            source = child.path
            try:
                info = child.stat(follow_symlinks=False)
            except OSError as exc:
                raise ContextError(f"cannot stat {source}: {exc.strerror}") from None
            mode = info.st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                continue  # sockets, fifos and devices have no place in an image build context
            entry = ContextEntry.of(name, source, info)
            if matcher.excluded(name):
                if stat.S_ISDIR(mode) and matcher.may_include_below(name):
                    excluded_dirs[name] = entry
                    visit(source, name + "/")
                continue
            entries[name] = entry
            add_parents(name)
            if stat.S_ISDIR(mode):
                visit(source, name + "/")

    visit(str(context), "")
    return [entries[name] for name in sorted(entries)]


def _tarinfo(entry: ContextEntry) -> tarfile.TarInfo:
    """A reproducible header: owner root with no names, permissions and whole-second mtime kept."""
    member = tarfile.TarInfo(entry.name)
    member.mode = stat.S_IMODE(entry.mode)
    member.mtime = entry.mtime
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    if stat.S_ISDIR(entry.mode):
        member.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(entry.mode):
        member.type = tarfile.SYMTYPE
        try:
            member.linkname = os.readlink(entry.source)
        except OSError as exc:
            raise ContextError(f"cannot read symlink {entry.source}: {exc.strerror}") from None
    else:
        member.type = tarfile.REGTYPE
        member.size = entry.size
    return member


def _add(archive: tarfile.TarFile, entry: ContextEntry) -> None:
    member = _tarinfo(entry)
    if member.type != tarfile.REGTYPE:
        archive.addfile(member)
        return
    source = entry.source
    try:
        with open(source, "rb") as data:
            archive.addfile(member, data)
    except OSError as exc:
        # tarfile raises a bare OSError when a file shrinks while it is copied.
        reason = exc.strerror or str(exc)
        raise ContextError(f"cannot read {source}: {reason}") from None


def walk_context(
    context_dir: str | os.PathLike[str], dockerfile: str | os.PathLike[str] | None = None
) -> ContextTree:
    """Every object of `context_dir` a build sends, honouring .dockerignore.

    The Dockerfile and the ignore file are always included, as docker does. A
    Dockerfile outside the context goes in as `.polyarch/Dockerfile`, under a
    `.polyarch` directory (0755, the Dockerfile's mtime) that replaces any the
    context has.
    """
    context = Path(context_dir)
    if not context.exists():
        raise ContextError(f"build context directory not found: {context}")
    if not context.is_dir():
        raise ContextError(f"build context is not a directory: {context}")
    context = context.resolve()
    dockerfile_path = _resolve_dockerfile(context, dockerfile)
    inside = _dockerfile_in_context(context, dockerfile_path)
    ignore_file = _ignore_file(context, dockerfile_path)
    always = ["!.dockerignore"]
    if inside is not None:
        always.append("!" + inside)
    try:
        matcher = PatternMatcher.from_file(ignore_file, extra=always)
    except DockerignoreError as exc:
        raise ContextError(f"invalid ignore file {exc}") from None
    except OSError as exc:
        raise ContextError(f"cannot read {ignore_file}: {exc.strerror}") from None

    entries = _walk(context, matcher)
    if inside is None:
        dockerfile_name = RESERVED_DOCKERFILE
        entries = [e for e in entries if e.name not in (".polyarch", RESERVED_DOCKERFILE)]
        info = dockerfile_path.stat()
        mtime = int(info.st_mtime)
        polyarch_dir = ContextEntry(
            ".polyarch", str(dockerfile_path.parent), stat.S_IFDIR | 0o755, mtime, 0
        )
        entries.append(polyarch_dir)
        entries.append(ContextEntry.of(RESERVED_DOCKERFILE, str(dockerfile_path), info))
        entries.sort(key=lambda e: e.name)
    else:
        dockerfile_name = inside
    return ContextTree(context, entries, dockerfile_name, dockerfile_path)


def pack_context(
    context_dir: str | os.PathLike[str],
    dockerfile: str | os.PathLike[str] | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
) -> PackedContext:
    """Packs `context_dir` (walk_context's tree) into a temporary tar file, hashing it as it
    is written.

    The tar is deterministic for a given tree: entries sorted by path, owner
    0:0 without names, permission bits and mtimes (whole seconds) kept,
    symlinks stored as symlinks. The caller owns the returned file (`discard()` it).
    """
    tree = walk_context(context_dir, dockerfile)
    entries = tree.entries

    spool = Path(spool_dir) if spool_dir is not None else None
    fd, tmp_name = tempfile.mkstemp(prefix="polyarch-context-", suffix=".tar", dir=spool)
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = _HashingWriter(raw)
            fileobj: Any = writer  # tarfile only calls write() in stream mode
            with tarfile.open(
                fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_COPY_BUFFER
            ) as archive:
                for entry in entries:
                    _add(archive, entry)
            writer.flush()
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return PackedContext(
        path=tmp_path,
        digest="sha256:" + writer.hasher.hexdigest(),
        size=writer.size,
        dockerfile=tree.dockerfile,
    )

"""Unpacks a build-context tar with our own checks: no tarfile extraction code, no link followed."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import stat
import sys
import tarfile
import zlib
from pathlib import Path
from typing import IO, BinaryIO, Literal, NoReturn, Protocol

from polyarch.proto.context_paths import PathRuleError, check_symlink, split_path

DEFAULT_MAX_BYTES = 8 << 30  # uncompressed archive bytes
DEFAULT_MAX_MEMBERS = 1_000_000
# tarfile reads a whole pax or GNU long-name header into memory (and on 3.11.7 parses pax
# records with a quadratic regex, CVE-2024-6232: ~0.2 s at 32 KiB, minutes at 1 MiB) before
# we see the member, so one header may use at most this much; legit ones stay under 10 KiB.
HEADER_WINDOW = 32 << 10
_BUFSIZE = 8 << 10  # tarfile's read-ahead: keep it well inside HEADER_WINDOW
_CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_REFUSED_TYPES = {
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}

Kind = Literal["dir", "file", "symlink"]


class ContextRefused(Exception):
    """The archive broke a rule; member is None when the archive as a whole is at fault."""

    def __init__(self, member: str | None, rule: str) -> None:
        where = "context archive" if member is None else f"context member {member!r}"
        super().__init__(f"{where}: {rule}")
        self.member = member
        self.rule = rule


def _refuse(member: str | None, rule: str) -> NoReturn:
    raise ContextRefused(member, rule)


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...
    def close(self) -> None: ...


def check_tar_safety() -> str:
    """Checks the OS primitives the unpacker needs; returns a line saying which unpack path runs."""
    needed = {
        "open/mkdir/symlink/link/unlink relative to a directory fd": all(
            f in os.supports_dir_fd for f in (os.open, os.mkdir, os.symlink, os.link, os.unlink)
        ),
        "utime without following symlinks": os.utime in os.supports_follow_symlinks,
        "symlink-attack-resistant shutil.rmtree": shutil.rmtree.avoids_symlink_attacks,
    }
    missing = [name for name, present in needed.items() if not present]
    if missing:
        raise RuntimeError(
            "cannot unpack build contexts safely on this platform: missing " + "; ".join(missing)
        )
    version = ".".join(map(str, sys.version_info[:3]))
    return (
        "build contexts unpack with polyarch's validated extractor (openat + O_NOFOLLOW, "
        f"no tarfile extraction filters); Python {version}'s tarfile only parses headers"
    )


def unpack_context(
    archive: Path,
    target: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    rootfs: bool = False,
) -> int:
    """Unpacks `archive` (plain, gzip, bzip2 or xz tar) into the empty directory `target`;
    returns how many entries were skipped.

    Raises ContextRefused naming the member and the rule it broke; on any failure the
    target is left empty again. `rootfs` unpacks an image's filesystem (an export) rather
    than a context: symlinks may point anywhere, as nothing here follows them, and devices
    and FIFOs are skipped rather than refused.
    """
    root_fd = os.open(target, _DIR_FLAGS)
    try:
        if os.listdir(root_fd):
            raise ValueError(f"unpack target {str(target)!r} is not empty")
        try:
            unpacker = _Unpacker(root_fd, max_bytes, max_members, rootfs)
            with archive.open("rb") as raw:
                unpacker.run(raw)
            return unpacker.skipped
        except BaseException as exc:
            try:
                empty_dir(root_fd)
            except OSError as cleanup:
                exc.add_note(f"removing the partial tree failed too: {cleanup}")
            raise
    finally:
        os.close(root_fd)


def empty_dir(dir_fd: int) -> None:
    """Removes everything in the folder `dir_fd`, following no symlink (a failed unpack's)."""
    for name in os.listdir(dir_fd):
        if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: never follows the tree's symlinks
        else:
            os.unlink(name, dir_fd=dir_fd)


def _decompressed(raw: BinaryIO, head: bytes) -> tuple[_Readable, bool]:
    # Docker accepts compressed contexts and the coordinator stores uploads as they came, so
    # decompress rather than refuse: _CappedReader counts the inflated bytes, which is what
    # a bomb inflates, and stops it at the cap.
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), True
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw), True
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw), True
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        _refuse(None, "is zstd-compressed; send a plain, gzip, bzip2 or xz tar")
    return raw, False


class _CappedReader:
    """The stream tarfile reads: refused once it passes the byte cap or a header's window."""

    def __init__(self, source: _Readable, compressed: bool, cap: int) -> None:
        self._source = source
        self._compressed = compressed
        self._cap = cap
        self._limit = min(cap, HEADER_WINDOW)
        self.consumed = 0

    def allow(self, extra: int) -> None:
        """Lets the next reads go `extra` bytes past what was consumed, never past the cap."""
        self._limit = min(self._cap, self.consumed + extra)

    def read(self, size: int) -> bytes:
        # one byte over the limit tells "more is coming" from "ends exactly at the limit"
        want = max(0, min(size, self._limit - self.consumed + 1))
        try:
            data = self._source.read(want)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
            if not self._compressed:
                raise  # a plain file that cannot be read is the disk's fault, not the archive's
            _refuse(None, f"cannot be decompressed: {exc}")
        self.consumed += len(data)
        if self.consumed > self._limit:
            if self._limit == self._cap:
                _refuse(None, f"unpacks to more than the {self._cap}-byte cap")
            _refuse(None, f"has a member header over {HEADER_WINDOW} bytes (pax or long-name)")
        return data

    # the rest of what tarfile.open types its fileobj with; stream mode only calls tell()
    def tell(self) -> int:
        return self.consumed

    def write(self, data: bytes, /) -> int:
        raise OSError("the context archive is read-only")

    def seek(self, pos: int, /) -> int:
        raise OSError("the context archive is read strictly in order")

    def close(self) -> None:
        pass  # run() closes the underlying stream


class _Unpacker:
    """Validates each member against what the archive already made, then writes it via fds."""

    def __init__(self, root_fd: int, max_bytes: int, max_members: int, rootfs: bool) -> None:
        self.root_fd = root_fd
        self.rootfs = rootfs
        self.skipped = 0
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.kinds: dict[str, Kind] = {}  # every path made so far, "a/b" form
        self.dir_meta: dict[str, tuple[int, float | None]] = {}  # final mode and mtime

    def run(self, raw: BinaryIO) -> None:
        head = raw.read(6)
        raw.seek(0)
        source, compressed = _decompressed(raw, head)
        reader = _CappedReader(source, compressed, self.max_bytes)
        count = 0
        try:
            # "r|": strictly sequential, so a header cannot send tarfile seeking backwards
            with tarfile.open(fileobj=reader, mode="r|", bufsize=_BUFSIZE) as tar:
                while (member := tar.next()) is not None:
                    # stream mode still keeps every TarInfo (undeclared in typeshed): a
                    # million members would hold ~0.5 GB; self.kinds is all we need later
                    tar.members.clear()  # type: ignore[attr-defined]
                    count += 1
                    if count > self.max_members:
                        _refuse(member.name, f"is past the limit of {self.max_members} members")
                    self._add(tar, reader, member)
                    reader.allow(HEADER_WINDOW)
            self._finish_dirs()
        except tarfile.TarError as exc:
            _refuse(None, f"is not a readable tar archive: {exc}")
        finally:
            source.close()

    def _add(self, tar: tarfile.TarFile, reader: _CappedReader, member: tarfile.TarInfo) -> None:
        name = member.name
        parts = _split(name, name, "")
        if self.rootfs and member.type in _REFUSED_TYPES:
            self.skipped += 1
            return
        kind = _kind_of(member)
        if not parts:
            if kind == "dir":
                return  # the context root itself, e.g. "./" from `tar -C dir -c .`
            _refuse(name, "names the context root but is not a directory")
        self._check_parents(name, parts, "")
        key = "/".join(parts)
        existing = self.kinds.get(key)
        if existing is not None and existing != kind:
            _refuse(name, f"is already in the archive as a {existing}; it cannot become a {kind}")
        if member.type == tarfile.SYMTYPE:
            _check_symlink(name, parts, member.linkname, anywhere=self.rootfs)
        elif member.type == tarfile.LNKTYPE:
            source = self._hardlink_source(name, key, member.linkname)
        elif kind == "file" and member.size < 0:  # base-256 sizes can be negative
            _refuse(name, f"declares a negative size ({member.size})")
        elif kind == "file" and reader.consumed + member.size > self.max_bytes:
            _refuse(name, f"holds {member.size} bytes, taking the context past its "
                          f"{self.max_bytes}-byte cap")  # fmt: skip

        # Validated: write. Each call is relative to a parent opened with O_NOFOLLOW, and
        # creates its leaf exclusively, so no symlink (from this archive or not) is followed.
        leaf, parent_fd = parts[-1], self._walk(parts[:-1], create=True)
        try:
            if existing in ("file", "symlink"):
                os.unlink(leaf, dir_fd=parent_fd)  # later entries replace earlier, as in tar
            if kind == "dir":
                if existing is None:
                    os.mkdir(leaf, 0o700, dir_fd=parent_fd)  # final mode after its children
                self.dir_meta[key] = (member.mode & 0o777, member.mtime)
            elif member.type == tarfile.SYMTYPE:
                os.symlink(member.linkname, leaf, dir_fd=parent_fd)
                _set_mtime(leaf, member.mtime, dir_fd=parent_fd)
            elif member.type == tarfile.LNKTYPE:
                source_fd = self._walk(source[:-1], create=False)
                try:
                    os.link(source[-1], leaf, src_dir_fd=source_fd, dst_dir_fd=parent_fd,
                            follow_symlinks=False)  # fmt: skip
                finally:
                    os.close(source_fd)
            else:
                data = tar.extractfile(member)
                assert data is not None  # tarfile has data for every regular member
                reader.allow(member.size + HEADER_WINDOW)
                _write_file(data, member, parent_fd, leaf)
        finally:
            os.close(parent_fd)
        self.kinds[key] = kind

    def _check_parents(self, member: str, parts: tuple[str, ...], what: str) -> None:
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            kind = self.kinds.get(prefix)
            if kind == "symlink":
                _refuse(member, f"{what}goes through {prefix!r}, a symlink in this archive; "
                                "nothing is written or linked through a symlink")  # fmt: skip
            if kind == "file":
                _refuse(member, f"{what}goes through {prefix!r}, which is a file")

    def _hardlink_source(self, member: str, key: str, linkname: str) -> tuple[str, ...]:
        what = f"hard link target {linkname!r} "
        parts = _split(linkname, member, what)
        self._check_parents(member, parts, what)
        source = "/".join(parts)
        kind = self.kinds.get(source)
        if kind is None:
            _refuse(member, f"{what}is not a file extracted earlier from this archive")
        if kind != "file":
            _refuse(member, f"{what}is a {kind}; only regular files can be hard-linked")
        if source == key:
            _refuse(member, "is a hard link to itself")
        return parts

    def _walk(self, dirs: tuple[str, ...], *, create: bool) -> int:
        """Opens dirs one level at a time with O_NOFOLLOW, making missing ones when asked."""
        fd = os.open(".", _DIR_FLAGS, dir_fd=self.root_fd)
        try:
            for depth, name in enumerate(dirs, 1):
                key = "/".join(dirs[:depth])
                if create and key not in self.kinds:
                    # a parent the archive never listed: docker makes these 0755 too
                    os.mkdir(name, 0o700, dir_fd=fd)
                    self.kinds[key] = "dir"
                    self.dir_meta[key] = (0o755, None)
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _finish_dirs(self) -> None:
        # deepest first, so a read-only directory is never one we still need to enter
        for key in sorted(self.dir_meta, key=lambda k: k.count("/"), reverse=True):
            mode, mtime = self.dir_meta[key]
            fd = self._walk(tuple(key.split("/")), create=False)
            try:
                os.fchmod(fd, mode)
                if mtime is not None:
                    _set_mtime(fd, mtime)
            finally:
                os.close(fd)


def _write_file(data: IO[bytes], member: tarfile.TarInfo, parent_fd: int, leaf: str) -> None:
    fd = os.open(leaf, _NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
    try:
        while chunk := data.read(_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        # permission bits only: no setuid/setgid/sticky, and no chown to archive ids
        os.fchmod(fd, member.mode & 0o777)
        _set_mtime(fd, member.mtime)
    finally:
        os.close(fd)


def _split(path: str, member: str, what: str) -> tuple[str, ...]:
    """The path's components with "" and "." dropped; refuses what could leave the tree."""
    try:
        return split_path(path, what)
    except PathRuleError as exc:
        _refuse(member, str(exc))


def _kind_of(member: tarfile.TarInfo) -> Kind:
    if member.sparse is not None:
        what = "a sparse file"
    elif member.type in _REGULAR_TYPES or member.type == tarfile.LNKTYPE:
        return "file"  # a hard link makes one more name for a regular file
    elif member.type == tarfile.DIRTYPE:
        return "dir"
    elif member.type == tarfile.SYMTYPE:
        return "symlink"
    else:
        what = _REFUSED_TYPES.get(member.type, f"of unsupported type {member.type!r}")
    _refuse(member.name, f"is {what}; only files, directories, symlinks and hard links are allowed")


def _check_symlink(
    member: str, parts: tuple[str, ...], target: str, anywhere: bool = False
) -> None:
    """Refuses a symlink whose target leaves the tree (proto/context_paths.py's rule)."""
    try:
        check_symlink(parts, target, anywhere)
    except PathRuleError as exc:
        _refuse(member, str(exc))


def _set_mtime(path: int | str, mtime: float, *, dir_fd: int | None = None) -> None:
    try:
        ns = int(mtime * 1_000_000_000)
        os.utime(path, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=dir_fd is None)
    except (OverflowError, ValueError):
        pass  # an mtime the filesystem cannot hold is not worth failing a build over

"""Lays a manifest context out in a job folder from the blob cache: the tree unpack_context makes.

Files are hard links to cache variants where the builder cannot write into the folder
(Builder.may_link_context: docker sends it to BuildKit; buildah only when the Dockerfile
mounts nothing of it writable), else private copies: a write through a shared inode would
change the cache under every other build. The job folder is private (0700) like the cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from polyarch.agent.blob_cache import BlobCache, copy_blob, hex_of, set_mtime, variant_name
from polyarch.agent.context_unpack import empty_dir
from polyarch.proto.context_manifest import ContextManifest, ManifestEntry
from polyarch.proto.context_paths import PathRuleError, check_symlink, split_path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class LayoutRefused(Exception):
    """A manifest entry that would leave the job folder (decode() refuses these already)."""

    def __init__(self, path: str, rule: str) -> None:
        super().__init__(f"context entry {path!r}: {rule}")
        self.path = path


@dataclass
class LayoutStats:
    """What a layout did: files hard-linked from the cache, private copies, variants made."""

    linked: int = 0
    copied: int = 0
    variants_made: int = 0


def lay_out(
    manifest: ContextManifest, target: Path, cache: BlobCache, *, link: bool = True
) -> LayoutStats:
    """Makes `manifest`'s tree in the empty directory `target`; every blob must be cached
    (and pinned). Files are hard links to cache variants, or with `link` False private
    copies (for a build that may write into its context). On failure the target is left
    empty again."""
    root_fd = os.open(target, _DIR_FLAGS)
    try:
        if os.listdir(root_fd):
            raise ValueError(f"layout target {str(target)!r} is not empty")
        blobs_fd, variants_fd = cache.open_dirs()
        layout = _Layout(root_fd, blobs_fd, variants_fd, cache, link)
        try:
            for entry in manifest.entries:
                layout.add(entry)
            layout.leave()
            layout.finish_dirs()
        except BaseException as exc:
            layout.leave()
            try:
                empty_dir(root_fd)
            except OSError as cleanup:
                exc.add_note(f"removing the partial tree failed too: {cleanup}")
            raise
        finally:
            os.close(blobs_fd)
            os.close(variants_fd)
        return layout.stats
    finally:
        os.close(root_fd)


class _Layout:
    """Creates entries in manifest order (parents first), each leaf exclusively, relative to
    directory fds opened one level at a time with O_NOFOLLOW."""

    def __init__(
        self, root_fd: int, blobs_fd: int, variants_fd: int, cache: BlobCache, link: bool
    ) -> None:
        self.link = link
        self.root_fd = root_fd
        self.blobs_fd = blobs_fd
        self.variants_fd = variants_fd
        self.cache = cache
        self.stats = LayoutStats()
        # the open chain of directories below the root: manifest order mostly goes deeper,
        # so each directory is opened about once
        self.names: list[str] = []
        self.fds: list[int] = []
        self.dirs: list[tuple[tuple[str, ...], int, int]] = []  # parts, mode, mtime
        self.linked_here: set[str] = set()  # variants this job already has a name of

    def add(self, entry: ManifestEntry) -> None:
        parts = _parts(entry)
        parent_fd = self._enter(parts[:-1])
        leaf = parts[-1]
        if entry.kind == "dir":
            os.mkdir(leaf, 0o700, dir_fd=parent_fd)  # final mode once its children are in
            self.dirs.append((parts, entry.mode & 0o777, entry.mtime))
        elif entry.kind == "symlink":
            os.symlink(entry.target, leaf, dir_fd=parent_fd)  # verbatim; never followed here
            set_mtime(leaf, entry.mtime, dir_fd=parent_fd)
        else:
            self._file(entry, parent_fd, leaf)

    def _enter(self, dirs: tuple[str, ...]) -> int:
        keep = 0
        while keep < min(len(dirs), len(self.names)) and dirs[keep] == self.names[keep]:
            keep += 1
        while len(self.names) > keep:
            self.names.pop()
            os.close(self.fds.pop())
        for name in dirs[keep:]:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fds[-1] if self.fds else self.root_fd)
            self.names.append(name)
            self.fds.append(fd)
        return self.fds[-1] if self.fds else self.root_fd

    def leave(self) -> None:
        """Closes the open chain of directories."""
        self._enter(())

    def _file(self, entry: ManifestEntry, parent_fd: int, leaf: str) -> None:
        mode = entry.mode & 0o777  # permission bits only, as the tar unpacker keeps them
        name = variant_name(entry.digest, mode, entry.mtime)
        # a second path of this job with the same content, mode and mtime gets a copy: one
        # inode under two names is a hard-link pair, which the tar path never makes
        if self.link and name not in self.linked_here:
            made = False
            while True:
                try:
                    os.link(name, leaf, src_dir_fd=self.variants_fd, dst_dir_fd=parent_fd,
                            follow_symlinks=False)  # fmt: skip
                except FileNotFoundError:
                    if made:
                        break  # swept as soon as made: copy rather than race
                    self.cache.make_variant(
                        self.variants_fd, self.blobs_fd, entry.digest, entry.size, mode,
                        entry.mtime,
                    )  # fmt: skip
                    self.stats.variants_made += 1
                    made = True
                    continue
                except FileExistsError:
                    raise
                except OSError:
                    break  # EXDEV, EMLINK, EPERM...: a private copy still works
                self.linked_here.add(name)
                self.stats.linked += 1
                return
        self._copy(entry, parent_fd, leaf, mode)

    def _copy(self, entry: ManifestEntry, parent_fd: int, leaf: str, mode: int) -> None:
        source = os.open(hex_of(entry.digest), _READ_FLAGS, dir_fd=self.blobs_fd)
        try:
            target = os.open(leaf, _NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
            try:
                copy_blob(source, target, entry.size, entry.digest)
                os.fchmod(target, mode)
                set_mtime(target, entry.mtime)
            finally:
                os.close(target)
        finally:
            os.close(source)
        self.stats.copied += 1

    def finish_dirs(self) -> None:
        # deepest first, so a read-only directory is never one we still need to enter
        for parts, mode, mtime in sorted(self.dirs, key=lambda d: len(d[0]), reverse=True):
            fd = self._enter(parts)
            os.fchmod(fd, mode)
            set_mtime(fd, mtime)
        self.leave()


def _parts(entry: ManifestEntry) -> tuple[str, ...]:
    """The entry's components; refuses what decode() refuses, as a second line of defence."""
    try:
        parts = split_path(entry.path)
        if not parts or "/".join(parts) != entry.path:
            raise PathRuleError("is not a normal relative path")
        if entry.kind == "symlink":
            check_symlink(parts, entry.target)
    except PathRuleError as exc:
        raise LayoutRefused(entry.path, str(exc)) from None
    return parts

"""A build context as a manifest of its files and their digests, for an incremental upload."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from polyarch.client.context import (
    ContextEntry,
    ContextError,
    PackedContext,
    pack_context,
    walk_context,
)
from polyarch.client.file_hashes import FileHashes, FileKey, default_hashes
from polyarch.proto.context_manifest import ContextManifest, ManifestEntry, ManifestError


@dataclass(frozen=True)
class ManifestContext:
    """A context described by its manifest, with where each file content can be read."""

    manifest: ContextManifest
    # The Dockerfile's path inside the context, to send as SubmitBuildRequest.dockerfile.
    dockerfile: str
    # Every distinct content (digest) -> a file that held it when hashed, to upload from.
    sources: dict[str, FileKey]
    context_dir: Path  # resolved
    dockerfile_path: Path  # absolute
    hashed_files: int = 0  # files read to make this manifest (cache misses)
    hashed_bytes: int = 0

    @property
    def digest(self) -> str:
        """The context's digest: the manifest's."""
        return self.manifest.digest

    @cached_property
    def files(self) -> int:
        return sum(entry.kind == "file" for entry in self.manifest.entries)

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    def pack(self, spool_dir: str | os.PathLike[str] | None = None) -> PackedContext:
        """The same tree as a tar (pack_context), for a coordinator that takes only tars."""
        return pack_context(self.context_dir, self.dockerfile_path, spool_dir)


def _file_key(entry: ContextEntry) -> FileKey:
    return FileKey(entry.source, entry.size, entry.mtime_ns, entry.ctime_ns, entry.inode)


def _manifest_entry(entry: ContextEntry, digest: str) -> ManifestEntry:
    mode = stat.S_IMODE(entry.mode)
    if stat.S_ISDIR(entry.mode):
        return ManifestEntry(entry.name, "dir", mode, entry.mtime)
    if stat.S_ISLNK(entry.mode):
        try:
            target = os.readlink(entry.source)
        except OSError as exc:
            raise ContextError(f"cannot read symlink {entry.source}: {exc.strerror}") from None
        return ManifestEntry(entry.name, "symlink", mode, entry.mtime, target=target)
    return ManifestEntry(entry.name, "file", mode, entry.mtime, size=entry.size, digest=digest)


def build_manifest(
    context_dir: str | os.PathLike[str],
    dockerfile: str | os.PathLike[str] | None = None,
    *,
    hashes: FileHashes | None = None,
) -> ManifestContext:
    """The manifest of exactly the tree pack_context would pack (walk_context's), its files
    hashed through `hashes` (default: the on-disk cache, default_hashes()).

    Raises ContextError naming the path for what cannot be read, and for what the manifest
    rules refuse (a symlink leaving the context, say), which no agent would unpack.
    """
    tree = walk_context(context_dir, dockerfile)
    if hashes is None:
        hashes = default_hashes()
    files = [e for e in tree.entries if not (stat.S_ISDIR(e.mode) or stat.S_ISLNK(e.mode))]
    keys = [_file_key(entry) for entry in files]
    hashed = hashes.digests(keys, under=str(tree.root))
    digests = dict(zip((entry.name for entry in files), hashed.digests, strict=True))
    sources: dict[str, FileKey] = {}
    for key, name in zip(keys, digests, strict=True):
        sources.setdefault(digests[name], key)
    entries = [_manifest_entry(entry, digests.get(entry.name, "")) for entry in tree.entries]
    try:
        manifest = ContextManifest.from_entries(entries)
    except ManifestError as exc:
        raise ContextError(f"build context {tree.root}: {exc}") from None
    return ManifestContext(
        manifest=manifest,
        dockerfile=tree.dockerfile,
        sources=sources,
        context_dir=tree.root,
        dockerfile_path=tree.dockerfile_source,
        hashed_files=hashed.hashed_files,
        hashed_bytes=hashed.hashed_bytes,
    )

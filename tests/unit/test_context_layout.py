"""Laying a manifest context out from the blob cache: the same tree unpack_context makes of the
tar of that folder, hard links to cache variants, never one inode twice in a job."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from polyarch.agent.blob_cache import BlobCache, variant_name
from polyarch.agent.context_layout import LayoutRefused, LayoutStats, lay_out
from polyarch.agent.context_unpack import unpack_context
from polyarch.client.context import pack_context
from polyarch.proto.context_manifest import ContextManifest, ManifestEntry
from tests.support.context_trees import digest_of, manifest_of_tree, snapshot

T = 1_700_000_000


def make_tree(root: Path) -> None:
    """Nested and empty dirs, modes, symlinks of every sort, shared contents."""
    files = {
        "Dockerfile": (b"FROM scratch\nCOPY . /\n", 0o644, T),
        "run.sh": (b"#!/bin/sh\necho hi\n", 0o755, T + 1),
        "secret.key": (b"hunter2\n", 0o600, T + 2),
        "private/notes.txt": (b"mine\n", 0o644, T + 3),
        "ro/child.txt": (b"read only parent\n", 0o444, T + 4),
        "ro/sub/deep.txt": (b"deep\n", 0o644, T + 5),
        "nested/a/b/c/leaf.txt": (b"leaf\n", 0o640, T + 6),
        "same-1.txt": (b"twice\n", 0o644, T + 7),
        "same-2.txt": (b"twice\n", 0o644, T + 7),  # same content, mode and mtime
        "twice-exec": (b"twice\n", 0o755, T + 8),  # same content, other mode and mtime
        "a-b": (b"sorts between a and a/b\n", 0o644, T),
        "a/b": (b"under a\n", 0o644, T),
        "empty-file": (b"", 0o644, T + 9),
        "setuid-tool": (b"#!/bin/sh\n", 0o4755, T + 9),  # kept as 0755, as the tar path keeps it
        "sticky/inside": (b"in a sticky folder\n", 0o644, T + 9),
    }
    for name, (data, mode, mtime) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        os.utime(path, (mtime, mtime))
    (root / "empty").mkdir()
    (root / "links").mkdir()
    links = {"to-file": "../run.sh", "to-dir": "../nested/a", "dangling": "nowhere", "self": "."}
    for name, target in links.items():
        (root / "links" / name).symlink_to(target)
        os.utime(root / "links" / name, (T + 10, T + 10), follow_symlinks=False)
    dirs = {
        "private": 0o700, "ro/sub": 0o755, "ro": 0o555, "empty": 0o755, "links": 0o755,
        "sticky": 0o1777,
    }  # fmt: skip
    for name in sorted({*dirs, "nested/a/b/c", "nested/a/b", "nested/a", "nested", "a"},
                       key=lambda d: d.count("/"), reverse=True):  # fmt: skip
        path = root / name
        path.chmod(dirs.get(name, 0o755))
        os.utime(path, (T + 20, T + 20))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    make_tree(root)
    return root


def cache_holding(root: Path, contents: dict[str, bytes]) -> BlobCache:
    """A blob cache that fetched `contents` (through the writer, as a fetch does)."""
    cache = BlobCache(root)
    for digest, data in contents.items():
        writer = cache.open_writer(digest, len(data), 0, hashlib.sha256())
        writer.write(data)
        writer.commit(None)
    return cache


def as_unpacked(tmp_path: Path, tree: Path) -> Path:
    """The tree as the tar path gives it to the builder: pack_context, then unpack_context."""
    packed = pack_context(tree, spool_dir=tmp_path)
    unpacked = fresh(tmp_path, "tar")
    unpack_context(packed.path, unpacked)
    packed.discard()
    return unpacked


def fresh(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "jobs" / name / "context"
    path.mkdir(parents=True)
    return path


def test_layout_is_the_tree_unpack_context_makes_of_the_same_folder(
    tmp_path: Path, tree: Path
) -> None:
    unpacked = as_unpacked(tmp_path, tree)
    manifest, contents = manifest_of_tree(tree)
    laid_out = fresh(tmp_path, "manifest")
    cache = cache_holding(tmp_path / "agent", contents)

    stats = lay_out(manifest, laid_out, cache)

    expected = snapshot(unpacked)
    assert snapshot(laid_out) == expected
    assert expected["ro"][:2] == ("dir", 0o555) and expected["empty"][0] == "dir"
    assert expected["links/to-dir"] == ("symlink", 0o777, (T + 10) * 10**9, b"../nested/a")
    assert (expected["setuid-tool"][1], expected["sticky"][1]) == (0o755, 0o777)
    # every file a new variant: the two same-* paths share one, so the second is a copy
    files = sum(1 for entry in manifest.entries if entry.kind == "file")
    assert stats == LayoutStats(linked=files - 1, copied=1, variants_made=files - 1)
    inodes = [p.stat().st_ino for p in laid_out.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(inodes) == len(set(inodes)) == files


def test_a_second_layout_hard_links_the_cache_variants_and_copies_nothing(
    tmp_path: Path, tree: Path
) -> None:
    (tree / "same-2.txt").unlink()  # no path pair that needs a private copy
    manifest, contents = manifest_of_tree(tree)
    cache = cache_holding(tmp_path / "agent", contents)
    first = fresh(tmp_path, "j1")
    lay_out(manifest, first, cache)
    shutil.rmtree(first.parent)

    second = fresh(tmp_path, "j2")
    stats = lay_out(manifest, second, cache)

    files = [entry for entry in manifest.entries if entry.kind == "file"]
    assert stats == LayoutStats(linked=len(files), copied=0, variants_made=0)
    for entry in files:
        variant = cache.variants_dir / variant_name(entry.digest, entry.mode, entry.mtime)
        assert (second / entry.path).stat().st_ino == variant.stat().st_ino
    assert snapshot(second) == snapshot(as_unpacked(tmp_path, tree))


def test_a_fetched_blob_is_its_first_variant_so_the_first_layout_copies_nothing(
    tmp_path: Path,
) -> None:
    data = b"x" * 100_000
    entries = [ManifestEntry("big", "file", 0o755, T, len(data), digest_of(data))]
    manifest = ContextManifest.from_entries(entries)
    cache = BlobCache(tmp_path / "agent")
    writer = cache.open_writer(digest_of(data), len(data), 0, hashlib.sha256())
    writer.write(data)
    writer.commit((0o755, T))

    stats = lay_out(manifest, fresh(tmp_path, "j"), cache)

    assert stats == LayoutStats(linked=1, copied=0, variants_made=0)
    blob = cache.blobs_dir / digest_of(data)[7:]
    laid = tmp_path / "jobs" / "j" / "context" / "big"
    assert laid.stat().st_ino == blob.stat().st_ino
    assert (laid.stat().st_mode & 0o777, laid.stat().st_mtime) == (0o755, T)


def test_a_link_failure_falls_back_to_a_copy(
    tmp_path: Path, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, contents = manifest_of_tree(tree)
    cache = cache_holding(tmp_path / "agent", contents)

    def cross_device(*args: object, **kwargs: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    target = fresh(tmp_path, "j")
    stats = lay_out(manifest, target, cache)

    files = sum(1 for entry in manifest.entries if entry.kind == "file")
    assert (stats.linked, stats.copied) == (0, files)
    assert snapshot(target) == snapshot(as_unpacked(tmp_path, tree))


def test_an_entry_that_would_leave_the_folder_is_refused_and_nothing_is_left(
    tmp_path: Path,
) -> None:
    # from_entries() validates like decode(): build the bad manifest past it, as a
    # corrupted in-memory manifest would be, to reach the layout's own defence
    entries = (
        ManifestEntry("Dockerfile", "file", 0o644, T, 0, digest_of(b"")),
        ManifestEntry("up", "symlink", 0o777, T, target="../../outside"),
    )
    manifest = ContextManifest(entries)
    cache = cache_holding(tmp_path / "agent", {digest_of(b""): b""})
    target = fresh(tmp_path, "j")
    with pytest.raises(LayoutRefused, match=r"context entry 'up': is a symlink to '../../outside'"):
        lay_out(manifest, target, cache)
    assert list(target.iterdir()) == []

    climbing = ContextManifest((ManifestEntry("../escape", "dir", 0o755, T),))
    with pytest.raises(LayoutRefused, match=r"has a '\.\.' component"):
        lay_out(climbing, target, cache)
    assert not (tmp_path / "jobs" / "j" / "escape").exists()

"""The file hash cache: hits skip reading, any change to size/mtime/ctime/inode re-reads, a
file changed too recently is not trusted, and an unusable cache only warns."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from polyarch.client import file_hashes
from polyarch.client.context import ContextError
from polyarch.client.file_hashes import (
    DATABASE,
    FileHashes,
    FileKey,
    Hashed,
    default_cache_dir,
)
from tests.support.poll import wait_until


def later() -> int:
    """A clock long after every file changed: nothing is racy."""
    return 1 << 62


def key_of(path: Path) -> FileKey:
    info = path.stat()
    return FileKey(str(path), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / name).write_text(f"content of {name}\n")
    return root


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths file_hashes actually opens and hashes."""
    seen: list[str] = []
    real = file_hashes.hash_file

    def counting(file: FileKey) -> tuple[str, bool]:
        seen.append(file.path)
        return real(file)

    monkeypatch.setattr(file_hashes, "hash_file", counting)
    return seen


def run(hashes: FileHashes, root: Path, names: tuple[str, ...] = ("a", "b", "c")) -> Hashed:
    return hashes.digests([key_of(root / name) for name in names], under=str(root))


def test_an_unchanged_tree_is_not_read_again(tree: Path, tmp_path: Path, reads: list[str]) -> None:
    first = run(FileHashes(tmp_path / "cache", clock_ns=later), tree)
    assert first.digests == [digest_of(f"content of {n}\n".encode()) for n in "abc"]
    assert first.hashed_files == 3 and len(reads) == 3
    again = run(FileHashes(tmp_path / "cache", clock_ns=later), tree)  # a new CLI run
    assert again == Hashed(first.digests, 0, 0)
    assert len(reads) == 3  # nothing opened


def test_new_content_of_the_same_size_with_the_mtime_put_back_is_read_again(
    tree: Path, tmp_path: Path
) -> None:
    hashes = FileHashes(tmp_path / "cache", clock_ns=later)
    run(hashes, tree)
    path = tree / "b"
    before = path.stat()

    def rewritten() -> bool:  # in place (same inode); ctime moves with the next clock tick
        path.write_text("CONTENT OF B\n")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        return path.stat().st_ctime_ns != before.st_ctime_ns

    wait_until(rewritten, timeout=5, interval=0.001, message="the ctime moved")
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino,
    )  # fmt: skip
    result = run(hashes, tree)
    assert result.hashed_files == 1
    assert result.digests[1] == digest_of(b"CONTENT OF B\n")


def test_a_file_replaced_by_another_with_the_same_size_and_times_is_read_again(
    tree: Path, tmp_path: Path
) -> None:
    hashes = FileHashes(tmp_path / "cache", clock_ns=later)
    run(hashes, tree)
    path, other = tree / "c", tree.parent / "other"
    before = path.stat()
    other.write_text("CONTENT OF C\n")
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(other, path)  # a new inode (the old one was alive when it was made)
    result = run(hashes, tree)
    assert result.hashed_files == 1
    assert result.digests[2] == digest_of(b"CONTENT OF C\n")


def test_a_file_changed_just_before_it_was_read_is_not_trusted_next_time(
    tree: Path, tmp_path: Path
) -> None:
    changed = max(key_of(tree / n).ctime_ns for n in "abc")
    soon = FileHashes(tmp_path / "cache", clock_ns=lambda: changed + 1_000_000)
    assert run(soon, tree).hashed_files == 3
    assert run(soon, tree).hashed_files == 3  # within one tick of a change: not kept
    settled = FileHashes(tmp_path / "cache", clock_ns=lambda: changed + 1_000_000_000)
    assert run(settled, tree).hashed_files == 3
    assert run(settled, tree).hashed_files == 0


def test_rows_of_files_no_longer_listed_are_dropped(tree: Path, tmp_path: Path) -> None:
    hashes = FileHashes(tmp_path / "cache", clock_ns=later)
    run(hashes, tree)
    outside = tmp_path / "Dockerfile"
    outside.write_text("FROM scratch\n")
    hashes.digests([key_of(tree / "a"), key_of(outside)], under=str(tree))
    with sqlite3.connect(tmp_path / "cache" / DATABASE) as db:
        paths = sorted(row[0] for row in db.execute("SELECT path FROM file_hashes_v1"))
    db.close()
    assert paths == sorted([os.fsencode(tree / "a"), os.fsencode(outside)])
    assert run(hashes, tree, ("a",)).hashed_files == 0


@pytest.mark.parametrize("spoil", ["a file", "garbage"])
def test_an_unusable_cache_warns_once_and_hashes_anyway(
    tree: Path, tmp_path: Path, spoil: str
) -> None:
    cache = tmp_path / "cache"
    if spoil == "a file":
        cache.write_text("not a directory")
    else:
        cache.mkdir()
        (cache / DATABASE).write_bytes(b"this is not an sqlite database" * 100)
    warnings: list[str] = []
    hashes = FileHashes(cache, warn=warnings.append, clock_ns=later)
    assert run(hashes, tree).digests[0] == digest_of(b"content of a\n")
    assert run(hashes, tree).hashed_files == 3
    assert len(warnings) == 1
    assert f"the file hash cache in {cache} is unusable" in warnings[0]


def test_two_runs_at_once_share_the_cache(tree: Path, tmp_path: Path) -> None:
    results: list[Hashed] = []
    errors: list[str] = []

    def one() -> None:
        hashes = FileHashes(tmp_path / "cache", warn=errors.append, clock_ns=later)
        results.append(run(hashes, tree))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len({tuple(r.digests) for r in results}) == 1
    assert run(FileHashes(tmp_path / "cache", clock_ns=later), tree).hashed_files == 0


def test_big_files_hash_on_the_pool_in_order(tmp_path: Path) -> None:
    contents = [os.urandom(size) for size in (3 << 20, 10, 2 << 20, 0, (1 << 20) + 1, 7)]
    paths = []
    for n, data in enumerate(contents):
        paths.append(tmp_path / f"f{n}")
        paths[-1].write_bytes(data)
    result = FileHashes(None, workers=3).digests([key_of(p) for p in paths])
    assert result.digests == [digest_of(data) for data in contents]
    assert result.hashed_bytes == sum(map(len, contents))


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda p: p.unlink(), "vanished while the context was being read"),
        (lambda p: p.write_text("x"), "shrank while the context was being read"),
    ],
)
def test_a_file_that_vanished_or_shrank_is_named(
    tree: Path, damage: Callable[[Path], None], says: str
) -> None:
    keys = [key_of(tree / name) for name in "abc"]
    damage(tree / "b")
    with pytest.raises(ContextError, match=re.escape(f"{tree / 'b'} {says}; run again")):
        FileHashes(None).digests(keys)


def test_the_cache_lives_where_the_environment_says(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("POLYARCH_CACHE_DIR", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "polyarch"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "polyarch"
    monkeypatch.setenv("POLYARCH_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"

"""Packing a build context: deterministic tar, .dockerignore, Dockerfile placement, errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from polyarch.client.context import (
    RESERVED_DOCKERFILE,
    ContextError,
    PackedContext,
    pack_context,
)


def write(root: Path, relative: str, text: str = "x") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def context(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    write(root, "Dockerfile", "FROM scratch\nCOPY . /\n")
    write(root, "app/main.py", "print('hi')\n")
    write(root, "app/util/helpers.py", "X = 1\n")
    write(root, "README.md", "# readme\n")
    (root / "app" / "link").symlink_to("main.py")
    os.chmod(root / "app" / "main.py", 0o755)
    return root


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


@pytest.fixture
def packs() -> Iterator[list[PackedContext]]:
    made: list[PackedContext] = []
    yield made
    for packed in made:
        packed.discard()


def pack(
    packs: list[PackedContext],
    context: Path,
    dockerfile: Path | str | None = None,
    spool_dir: Path | None = None,
) -> PackedContext:
    packed = pack_context(context, dockerfile, spool_dir=spool_dir)
    packs.append(packed)
    return packed


def members(packed: PackedContext) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(packed.path) as archive:
        return {m.name: m for m in archive.getmembers()}


def read(packed: PackedContext, name: str) -> str:
    with tarfile.open(packed.path) as archive:
        data = archive.extractfile(name)
        assert data is not None
        return data.read().decode()


def test_the_same_tree_gives_the_same_digest(
    context: Path, tmp_path: Path, spool: Path, packs: list[PackedContext]
) -> None:
    first = pack(packs, context, spool_dir=spool)
    second = pack(packs, context, spool_dir=spool)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(context, copy, symlinks=True)  # copy2 keeps mtimes and modes
    third = pack(packs, copy, spool_dir=spool)
    assert first.digest == second.digest == third.digest
    assert first.path != second.path
    assert first.path.parent == spool


def test_digest_and_size_describe_the_file(context: Path, packs: list[PackedContext]) -> None:
    packed = pack(packs, context)
    data = packed.path.read_bytes()
    assert packed.size == len(data)
    assert packed.digest == "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_changed_file_changes_the_digest(context: Path, packs: list[PackedContext]) -> None:
    before = pack(packs, context)
    (context / "app" / "main.py").write_text("print('changed')\n")
    after = pack(packs, context)
    assert before.digest != after.digest


def test_entries_are_sorted_and_owned_by_root(context: Path, packs: list[PackedContext]) -> None:
    packed = pack(packs, context)
    infos = members(packed)
    names = list(infos)
    assert names == sorted(names)
    assert set(names) == {
        "Dockerfile",
        "README.md",
        "app",
        "app/link",
        "app/main.py",
        "app/util",
        "app/util/helpers.py",
    }
    for info in infos.values():
        assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
    assert infos["app/link"].issym() and infos["app/link"].linkname == "main.py"
    assert infos["app"].isdir()
    assert infos["app/main.py"].mode == 0o755
    assert infos["README.md"].mtime == int((context / "README.md").stat().st_mtime)
    assert packed.dockerfile == "Dockerfile"


def test_dockerignore_excludes_files_and_directories(
    context: Path, packs: list[PackedContext]
) -> None:
    write(context, "debug.log")
    write(context, "app/trace.log")
    write(context, "build/out/app.bin")
    write(context, ".git/HEAD")
    write(context, ".dockerignore", "**/*.log\nbuild\n.git\n# comment\n")
    names = set(members(pack(packs, context)))
    assert "debug.log" not in names
    assert "app/trace.log" not in names
    assert not any(n == "build" or n.startswith(("build/", ".git")) for n in names)
    assert {".dockerignore", "Dockerfile", "app/main.py"} <= names


def test_exception_below_an_excluded_directory_keeps_its_parents(
    context: Path, packs: list[PackedContext]
) -> None:
    write(context, "build/keep/me.txt", "kept")
    write(context, "build/drop.txt")
    write(context, ".dockerignore", "build\n!build/keep/me.txt\n")
    names = set(members(pack(packs, context)))
    assert {"build", "build/keep", "build/keep/me.txt"} <= names
    assert "build/drop.txt" not in names


def test_dockerfile_and_dockerignore_are_sent_even_when_ignored(
    context: Path, packs: list[PackedContext]
) -> None:
    write(context, ".dockerignore", "*\n")
    names = set(members(pack(packs, context)))
    assert names == {".dockerignore", "Dockerfile"}


def test_dockerfile_in_an_ignored_subdirectory_is_sent(
    context: Path, packs: list[PackedContext]
) -> None:
    write(context, "docker/prod.Dockerfile", "FROM scratch\n")
    write(context, "docker/other")
    write(context, ".dockerignore", "docker\n")
    packed = pack(packs, context, context / "docker" / "prod.Dockerfile")
    names = set(members(packed))
    assert packed.dockerfile == "docker/prod.Dockerfile"
    assert "docker/prod.Dockerfile" in names
    assert "docker/other" not in names


def test_dockerfile_specific_ignore_file_wins(context: Path, packs: list[PackedContext]) -> None:
    write(context, ".dockerignore", "README.md\n")
    write(context, "Dockerfile.dockerignore", "app\n")
    names = set(members(pack(packs, context)))
    assert "README.md" in names
    assert not any(n.startswith("app") for n in names)


def test_dockerfile_outside_the_context_goes_in_under_a_reserved_name(
    context: Path, tmp_path: Path, packs: list[PackedContext]
) -> None:
    outside = write(tmp_path / "ci", "Build.Dockerfile", "FROM busybox\n")
    packed = pack(packs, context, outside)
    assert packed.dockerfile == RESERVED_DOCKERFILE
    infos = members(packed)
    assert infos[".polyarch"].isdir()
    assert read(packed, RESERVED_DOCKERFILE) == "FROM busybox\n"
    assert read(packed, "Dockerfile") == "FROM scratch\nCOPY . /\n"


def test_relative_dockerfile_is_relative_to_the_working_directory(
    context: Path, packs: list[PackedContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    write(context, "sub/Dockerfile.dev", "FROM scratch\n")
    monkeypatch.chdir(context / "sub")
    packed = pack(packs, context, "Dockerfile.dev")
    assert packed.dockerfile == "sub/Dockerfile.dev"


def test_missing_context_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ContextError, match="not found") as info:
        pack_context(missing)
    assert str(missing) in str(info.value)


def test_a_file_is_not_a_context(context: Path) -> None:
    with pytest.raises(ContextError, match="not a directory") as info:
        pack_context(context / "README.md")
    assert "README.md" in str(info.value)


def test_missing_dockerfile_is_named(context: Path, tmp_path: Path) -> None:
    (context / "Dockerfile").unlink()
    with pytest.raises(ContextError, match="Dockerfile not found") as info:
        pack_context(context)
    assert str(context / "Dockerfile") in str(info.value)
    elsewhere = tmp_path / "x" / "Custom.Dockerfile"
    with pytest.raises(ContextError, match=r"Custom\.Dockerfile"):
        pack_context(context, elsewhere)


def test_a_bad_ignore_pattern_is_a_context_error(context: Path) -> None:
    write(context, ".dockerignore", "!\n")
    with pytest.raises(ContextError, match="illegal exclusion"):
        pack_context(context)


def test_no_temporary_file_is_left_after_an_error(context: Path, spool: Path) -> None:
    (context / "Dockerfile").unlink()
    with pytest.raises(ContextError):
        pack_context(context, spool_dir=spool)
    assert list(spool.iterdir()) == []

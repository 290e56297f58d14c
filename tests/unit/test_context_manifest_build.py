"""A context's manifest describes exactly the tree pack_context packs: paths, kinds, modes,
mtimes, symlink targets and contents, .dockerignore and the Dockerfile rules included."""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from polyarch.client.context import RESERVED_DOCKERFILE, ContextError, pack_context
from polyarch.client.context_manifest import ManifestContext, build_manifest
from polyarch.client.file_hashes import FileHashes

KINDS = {tarfile.DIRTYPE: "dir", tarfile.REGTYPE: "file", tarfile.SYMTYPE: "symlink"}


def write(root: Path, relative: str, text: str = "x", mode: int | None = None) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mode is not None:
        path.chmod(mode)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    write(root, "Dockerfile", "FROM scratch\nCOPY . /\n")
    write(root, "app/main.py", "print('hi')\n", 0o755)
    write(root, "app/secret.key", "key", 0o600)
    write(root, "app/deep/er/still.txt", "deep\n")
    write(root, "app/twin.txt", "deep\n")  # the same content as still.txt
    write(root, "logs/today.log", "noise\n")
    write(root, "logs/keep.log", "kept\n")
    write(root, "node_modules/pkg/index.js", "module\n")
    write(root, "empty.txt", "")
    (root / "app" / "empty-dir").mkdir()
    (root / "app" / "private").mkdir(mode=0o700)
    (root / "app" / "link").symlink_to("main.py")
    (root / "app" / "deep" / "up").symlink_to("../twin.txt")
    (root / "dangling").symlink_to("nowhere")
    os.utime(root / "app" / "main.py", (1_600_000_000, 1_600_000_000))
    (root / ".dockerignore").write_text("node_modules\nlogs\n!logs/keep.log\n**/*.key\n")
    return root


def tar_view(root: Path, dockerfile: Path | None = None) -> dict[str, tuple[Any, ...]]:
    """path -> (kind, mode, mtime, size, content digest, symlink target) of pack_context's tar."""
    packed = pack_context(root, dockerfile)
    view: dict[str, tuple[Any, ...]] = {}
    try:
        with tarfile.open(packed.path) as archive:
            for member in archive.getmembers():
                digest = ""
                if member.isfile():
                    data = archive.extractfile(member)
                    assert data is not None
                    digest = "sha256:" + hashlib.sha256(data.read()).hexdigest()
                view[member.name] = (KINDS[member.type], member.mode, member.mtime,
                                     member.size, digest, member.linkname)  # fmt: skip
    finally:
        packed.discard()
    return view


def manifest_view(context: ManifestContext) -> dict[str, tuple[Any, ...]]:
    return {
        e.path: (e.kind, e.mode, e.mtime, e.size, e.digest, e.target)
        for e in context.manifest.entries
    }


def describe(root: Path, dockerfile: Path | None = None) -> ManifestContext:
    return build_manifest(root, dockerfile, hashes=FileHashes(None))


def test_the_manifest_describes_the_tar_exactly(tree: Path) -> None:
    context = describe(tree)
    view = manifest_view(context)
    assert view == tar_view(tree)
    assert "logs/keep.log" in view and "logs" in view  # re-included, with its parent
    assert not {"logs/today.log", "node_modules", "app/secret.key"} & set(view)
    assert view["app/main.py"][:3] == ("file", 0o755, 1_600_000_000)
    assert view["app/private"][:2] == ("dir", 0o700)
    assert view["app/empty-dir"][0] == "dir"
    assert view["app/link"][0] == "symlink" and view["app/link"][5] == "main.py"
    assert view["dangling"][5] == "nowhere"
    assert context.dockerfile == "Dockerfile"
    assert context.files == 7 and context.total_bytes == sum(v[3] for v in view.values())


def test_each_content_has_a_source_file_holding_it(tree: Path) -> None:
    context = describe(tree)
    assert set(context.sources) == set(context.manifest.blobs)
    assert len(context.sources) == context.files - 1  # twin.txt and still.txt share one
    for digest, source in context.sources.items():
        assert "sha256:" + hashlib.sha256(Path(source.path).read_bytes()).hexdigest() == digest


def test_a_dockerfile_outside_the_context_goes_in_under_the_reserved_name(
    tree: Path, tmp_path: Path
) -> None:
    outside = write(tmp_path / "elsewhere", "build.Dockerfile", "FROM scratch\n")
    write(tree, RESERVED_DOCKERFILE, "the context's own, replaced\n")
    context = describe(tree, outside)
    view = manifest_view(context)
    assert view == tar_view(tree, outside)
    assert context.dockerfile == RESERVED_DOCKERFILE
    assert view[".polyarch"][:2] == ("dir", 0o755)
    digest = view[RESERVED_DOCKERFILE][4]
    assert context.sources[digest].path == str(outside)


def test_the_digest_is_stable_and_follows_modes_and_contents(tree: Path) -> None:
    first = describe(tree)
    assert describe(tree).digest == first.digest
    (tree / "app" / "twin.txt").chmod(0o640)
    moded = describe(tree)
    assert moded.digest != first.digest
    write(tree, "app/twin.txt", "other\n", 0o640)
    os.utime(tree / "app" / "twin.txt", ns=(0, (tree / "app" / "twin.txt").stat().st_mtime_ns))
    assert describe(tree).digest != moded.digest


def test_a_symlink_out_of_the_context_is_refused_naming_it(tree: Path) -> None:
    (tree / "app" / "escape").symlink_to("../../outside")
    says = "entry 'app/escape' is a symlink to '../../outside', which points outside"
    with pytest.raises(ContextError, match=re.escape(says)):
        describe(tree)


def test_the_pack_of_a_manifest_context_is_pack_context(tree: Path, tmp_path: Path) -> None:
    outside = write(tmp_path / "elsewhere", "Dockerfile", "FROM scratch\n")
    context = describe(tree, outside)
    packed, direct = context.pack(), pack_context(tree, outside)
    try:
        assert packed.digest == direct.digest
    finally:
        packed.discard()
        direct.discard()

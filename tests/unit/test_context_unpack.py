"""The context unpacker: a corpus of hostile tars refused with nothing written outside, and
ordinary contexts (nested dirs, modes, symlinks, hard links, ./ prefixes) unpacked as docker
would see them."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import tarfile
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import polyarch.agent
from polyarch.agent.context_unpack import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MEMBERS,
    HEADER_WINDOW,
    ContextRefused,
    check_tar_safety,
    unpack_context,
)
from polyarch.client.context import pack_context

MTIME = 1_700_000_000
Entry = tuple[tarfile.TarInfo, bytes]


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    linkname: str = "",
    mtime: int = MTIME,
) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, linkname, mtime
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    return entry(name, data=data, mode=mode)


def directory(name: str, mode: int = 0o755) -> Entry:
    return entry(name, tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> Entry:
    return entry(name, tarfile.SYMTYPE, mode=0o777, linkname=target)


def hardlink(name: str, target: str) -> Entry:
    return entry(name, tarfile.LNKTYPE, linkname=target)


def tar_of(*entries: Entry) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buffer.getvalue()


DOCKERFILE = file("Dockerfile", b"FROM scratch\n")


@dataclass
class Arena:
    """A target with a sentinel sibling; `root` is snapshotted around every refusal."""

    root: Path
    target: Path
    sentinel: Path
    archive: Path

    def snapshot(self) -> dict[str, tuple[int, int, str | bytes]]:
        """Every path under root but inside target: type and mode, mtime, content or link."""
        seen: dict[str, tuple[int, int, str | bytes]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != self.target]
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                info = path.lstat()
                content: str | bytes = b""
                if stat.S_ISLNK(info.st_mode):
                    content = os.readlink(path)
                elif stat.S_ISREG(info.st_mode):
                    content = path.read_bytes()
                seen[str(path)] = (info.st_mode, info.st_mtime_ns, content)
        return seen


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    base = tmp_path / "work" / "jobs"
    target = base / "context"
    target.mkdir(parents=True)
    sentinel = base / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret").write_bytes(b"keep me")
    (base / "flag").write_bytes(b"original")
    return Arena(tmp_path, target, sentinel, tmp_path / "context.tar")


def refuse(
    arena: Arena,
    blob: bytes,
    member: str | None,
    rule: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> None:
    """Asserts the exact refusal, that nothing outside changed and that target is empty."""
    arena.archive.write_bytes(blob)
    before = arena.snapshot()
    with pytest.raises(ContextRefused) as raised:
        unpack_context(arena.archive, arena.target, max_bytes=max_bytes, max_members=max_members)
    assert (raised.value.member, raised.value.rule) == (member, rule)
    assert arena.snapshot() == before
    assert list(arena.target.iterdir()) == []


def unpack(arena: Arena, blob: bytes) -> Path:
    arena.archive.write_bytes(blob)
    unpack_context(arena.archive, arena.target)
    return arena.target


# ---- names ------------------------------------------------------------------------------


def test_an_absolute_path_is_refused(arena: Arena) -> None:
    victim = str(arena.sentinel / "secret")
    refuse(arena, tar_of(DOCKERFILE, file(victim, b"pwned")), victim, "is an absolute path")


@pytest.mark.parametrize("name", ["../flag", "sub/../../flag", "./../sentinel/new"])
def test_a_dotdot_escape_is_refused(arena: Arena, name: str) -> None:
    refuse(arena, tar_of(DOCKERFILE, file(name, b"pwned")), name, "has a '..' component")


def test_a_nul_in_a_name_is_refused(arena: Arena) -> None:
    name = "x" * 120 + "\x00.sh"  # long enough that tarfile stores it in a pax record
    refuse(arena, tar_of(DOCKERFILE, file(name)), name, "contains a NUL byte")


def test_a_name_component_over_255_bytes_is_refused(arena: Arena) -> None:
    name = "d/" + "é" * 128  # 256 bytes in UTF-8, though only 128 characters
    refuse(arena, tar_of(file(name)), name, "has a component longer than 255 bytes")


def test_a_path_over_4096_bytes_is_refused(arena: Arena) -> None:
    name = "/".join(["d" * 250] * 17)
    refuse(arena, tar_of(file(name)), name, "is longer than 4096 bytes")


def test_a_path_deeper_than_64_levels_is_refused(arena: Arena) -> None:
    name = "/".join(["d"] * 64 + ["f"])
    refuse(arena, tar_of(file(name)), name, "is 65 levels deep, over the limit of 64")


def through_link(link: str) -> str:
    return (
        f"goes through {link!r}, a symlink in this archive; "
        "nothing is written or linked through a symlink"
    )


# ---- symlinks ----------------------------------------------------------------------------


def test_a_symlink_to_etc_then_a_file_through_it_is_refused(arena: Arena) -> None:
    blob = tar_of(DOCKERFILE, symlink("etc", "/etc"), file("etc/polyarch-test-pwned", b"x"))
    refuse(arena, blob, "etc", "is a symlink to the absolute path '/etc'; targets must be relative")
    assert not Path("/etc/polyarch-test-pwned").exists()


def test_a_symlink_to_the_sentinel_then_a_file_through_it_is_refused(arena: Arena) -> None:
    out = str(arena.sentinel)
    blob = tar_of(symlink("out", out), file("out/secret", b"pwned"))
    refuse(
        arena, blob, "out", f"is a symlink to the absolute path {out!r}; targets must be relative"
    )


def test_a_relative_symlink_out_of_the_tree_is_refused(arena: Arena) -> None:
    blob = tar_of(directory("a"), symlink("a/up", "../../sentinel"), file("a/up/secret", b"x"))
    refuse(
        arena, blob, "a/up", "is a symlink to '../../sentinel', which points outside the context"
    )


def test_a_file_is_never_written_through_an_in_tree_symlink(arena: Arena) -> None:
    # the link itself is harmless; writing through it is what a later "a/up" swap exploits
    blob = tar_of(directory("real"), symlink("alias", "real"), file("alias/f", b"x"))
    refuse(arena, blob, "alias/f", through_link("alias"))


def test_a_dot_symlink_chain_is_refused(arena: Arena) -> None:
    # a -> ., b -> a/a/a/a: both stay inside; what follows tries to climb out through them
    chain = (DOCKERFILE, symlink("a", "."), symlink("b", "a/a/a/a"))
    refuse(arena, tar_of(*chain, file("b/../../x", b"x")), "b/../../x", "has a '..' component")
    rule = "is a symlink to 'b/../../x', which has '..' after a name; only leading '..' are allowed"
    refuse(arena, tar_of(*chain, symlink("c", "b/../../x")), "c", rule)


def test_links_nested_through_links_are_refused(arena: Arena) -> None:
    # x/a -> ., then x/a/b -> . is really x/b, then x/a/b/c -> ../.. is x/c: two levels out
    blob = tar_of(
        directory("x"), symlink("x/a", "."), symlink("x/a/b", "."), symlink("x/a/b/c", "../..")
    )
    refuse(arena, blob, "x/a/b", through_link("x/a"))


def test_a_dotdot_after_a_link_to_a_shallower_dir_is_refused(arena: Arena) -> None:
    # lexically d1/d2/up/../.. is d1, but up -> ../.. is the root, so the kernel goes out
    blob = tar_of(symlink("d1/d2/up", "../.."), symlink("d1/d2/t", "up/../.."))
    rule = "is a symlink to 'up/../..', which has '..' after a name; only leading '..' are allowed"
    refuse(arena, blob, "d1/d2/t", rule)


STEPS = "abcdefghijklmnop"
LINKPATH = "/".join([*STEPS, "l" * 254])  # a/b/.../p/lll...: short, but huge once resolved


def nested_dirs_and_step_links(component: str) -> list[Entry]:
    """16 nested dirs named `component`, with a one-letter symlink to each beside it."""
    entries: list[Entry] = []
    for depth, step in enumerate(STEPS):
        parent = "/".join([component] * depth)
        entries.append(directory(os.path.join(parent, component), mode=0o777))
        entries.append(symlink(os.path.join(parent, step), component))
    return entries


def test_the_cve_2025_4517_chain_is_refused(arena: Arena) -> None:
    # CPython's test_realpath_limit_attack: components sized so that realpath() of the long
    # link overflows PATH_MAX and stops resolving, which let "data" pass an escaping link
    max_path = os.pathconf(arena.target, "PC_PATH_MAX")
    component = "d" * ((max_path - len(str(arena.target)) - 1) // (len(STEPS) + 1))
    linkpath = LINKPATH
    entries = nested_dirs_and_step_links(component)
    entries += [
        symlink(linkpath, os.path.join(*[".."] * 16)),
        symlink("escape", os.path.join(linkpath, "..")),
        hardlink("flaglink", "escape/flag"),
        file("flaglink", b"overwrite"),
        file("escape/newfile", b"new"),
    ]
    refuse(arena, tar_of(*entries), linkpath, through_link("a"))


def test_the_cve_2025_4517_chain_through_real_dirs_is_refused(arena: Arena) -> None:
    # the same chain with the long link placed under the real directories, where it may
    # stand (16 levels up from 16 deep is the root); the escape is the '..' after it
    entries = nested_dirs_and_step_links("d" * 200)
    entries += [
        symlink("/".join(["d" * 200] * 16 + ["l" * 254]), "/".join([".."] * 16)),
        symlink("escape", LINKPATH + "/.."),
        file("escape/newfile", b"new"),
    ]
    rule = (
        f"is a symlink to {LINKPATH + '/..'!r}, which has '..' after a name; "
        "only leading '..' are allowed"
    )
    refuse(arena, tar_of(*entries), "escape", rule)


def test_an_empty_symlink_target_is_refused(arena: Arena) -> None:
    refuse(arena, tar_of(symlink("s", "")), "s", "is a symlink with an empty target")


# ---- hard links ---------------------------------------------------------------------------


def test_a_hard_link_to_an_outside_file_is_refused(arena: Arena) -> None:
    secret = str(arena.sentinel / "secret")
    blob = tar_of(hardlink("h", secret), file("h", b"overwrite"))
    refuse(arena, blob, "h", f"hard link target {secret!r} is an absolute path")
    blob = tar_of(hardlink("h", "../sentinel/secret"), file("h", b"overwrite"))
    refuse(arena, blob, "h", "hard link target '../sentinel/secret' has a '..' component")


def test_a_hard_link_to_a_file_not_in_the_archive_is_refused(arena: Arena) -> None:
    blob = tar_of(DOCKERFILE, hardlink("h", "etc/shadow"))
    rule = "hard link target 'etc/shadow' is not a file extracted earlier from this archive"
    refuse(arena, blob, "h", rule)


def test_a_hard_link_to_a_symlink_is_refused(arena: Arena) -> None:
    blob = tar_of(DOCKERFILE, symlink("s", "Dockerfile"), hardlink("h", "s"))
    rule = "hard link target 's' is a symlink; only regular files can be hard-linked"
    refuse(arena, blob, "h", rule)


def test_a_hard_link_through_a_symlink_is_refused(arena: Arena) -> None:
    blob = tar_of(file("d/f", b"x"), symlink("s", "d"), hardlink("h", "s/f"))
    refuse(arena, blob, "h", "hard link target 's/f' " + through_link("s"))


def test_a_hard_link_to_a_directory_or_itself_is_refused(arena: Arena) -> None:
    blob = tar_of(directory("d"), hardlink("h", "d"))
    refuse(arena, blob, "h", "hard link target 'd' is a dir; only regular files can be hard-linked")
    refuse(arena, tar_of(DOCKERFILE, hardlink("Dockerfile", "Dockerfile")), "Dockerfile",
           "is a hard link to itself")  # fmt: skip


# ---- types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.CHRTYPE, "a character device"),
        (tarfile.BLKTYPE, "a block device"),
        (tarfile.FIFOTYPE, "a FIFO"),
        (b"V", "of unsupported type b'V'"),
    ],
)
def test_special_members_are_refused(arena: Arena, kind: bytes, what: str) -> None:
    special, _ = entry("dev/null", kind)
    special.devmajor, special.devminor = 1, 3
    rule = f"is {what}; only files, directories, symlinks and hard links are allowed"
    refuse(arena, tar_of(DOCKERFILE, (special, b"")), "dev/null", rule)


@pytest.mark.parametrize(
    ("first", "second", "rule"),
    [
        (file("x"), directory("x"), "is already in the archive as a file; it cannot become a dir"),
        (directory("x"), file("x"), "is already in the archive as a dir; it cannot become a file"),
        (
            file("x"),
            symlink("x", "y"),
            "is already in the archive as a file; it cannot become a symlink",
        ),
        (
            symlink("x", "y"),
            file("x"),
            "is already in the archive as a symlink; it cannot become a file",
        ),
    ],
)
def test_a_duplicate_that_changes_type_is_refused(
    arena: Arena, first: Entry, second: Entry, rule: str
) -> None:
    refuse(arena, tar_of(DOCKERFILE, first, second), "x", rule)


def test_a_member_under_a_file_is_refused(arena: Arena) -> None:
    refuse(arena, tar_of(file("x"), file("x/y")), "x/y", "goes through 'x', which is a file")


# ---- caps and compression ------------------------------------------------------------------


def zeros_tar(size: int) -> bytes:
    """A tar holding one file of `size` zero bytes, streamed rather than held twice."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    return buffer.getvalue()


def test_a_gzip_bomb_stops_at_the_cap(arena: Arena) -> None:
    bomb = gzip.compress(zeros_tar(64 << 20), compresslevel=9)
    assert len(bomb) < 128 << 10
    # cut the stream in half: reading past the refusal point would fail to decompress instead
    rule = "holds 67108864 bytes, taking the context past its 1048576-byte cap"
    refuse(arena, bomb[: len(bomb) // 2], "zeros", rule, max_bytes=1 << 20)


def test_a_pax_header_bomb_stops_at_the_header_window(arena: Arena) -> None:
    info = tarfile.TarInfo("f")
    info.pax_headers = {"comment": "0" * (16 << 20)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info)
    bomb = gzip.compress(buffer.getvalue(), compresslevel=9)
    rule = f"has a member header over {HEADER_WINDOW} bytes (pax or long-name)"
    refuse(arena, bomb[: len(bomb) // 2], None, rule)


def test_many_files_stop_at_the_byte_cap(arena: Arena) -> None:
    blob = tar_of(*(file(f"f{i}", bytes(400 << 10)) for i in range(4)))
    rule = "holds 409600 bytes, taking the context past its 1048576-byte cap"
    refuse(arena, gzip.compress(blob), "f2", rule, max_bytes=1 << 20)


def test_headers_alone_count_against_the_byte_cap(arena: Arena) -> None:
    blob = tar_of(*(file(f"f{i}") for i in range(40)))
    refuse(arena, blob, None, "unpacks to more than the 8192-byte cap", max_bytes=8192)


def test_a_negative_size_is_refused(arena: Arena) -> None:
    info = tarfile.TarInfo("neg")
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"\xff" * 11 + b"\x00"  # size -256 in GNU base-256 encoding
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    blob = tar_of(DOCKERFILE)[:1024] + bytes(header) + bytes(1024)
    refuse(arena, blob, "neg", "declares a negative size (-256)")


def test_too_many_members_are_refused(arena: Arena) -> None:
    blob = tar_of(*(file(f"f{i:02}") for i in range(11)))
    refuse(arena, blob, "f10", "is past the limit of 10 members", max_members=10)


def test_a_truncated_compressed_archive_is_refused(arena: Arena) -> None:
    blob = gzip.compress(tar_of(DOCKERFILE, file("big", os.urandom(64 << 10))))
    refuse(arena, blob[:-2000], None, "cannot be decompressed: "
           "Compressed file ended before the end-of-stream marker was reached")  # fmt: skip


def test_zstd_and_garbage_are_refused(arena: Arena) -> None:
    refuse(arena, b"\x28\xb5\x2f\xfd" + bytes(600), None,
           "is zstd-compressed; send a plain, gzip, bzip2 or xz tar")  # fmt: skip
    refuse(arena, b"not a tar" * 100, None, "is not a readable tar archive: invalid header")


# ---- what is allowed -----------------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple[str, int, str | bytes]]:
    """Relative path -> (type, permission bits, content or link target)."""
    out: dict[str, tuple[str, int, str | bytes]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        name = path.relative_to(root).as_posix()
        if stat.S_ISLNK(info.st_mode):
            out[name] = ("link", 0, os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            out[name] = ("dir", stat.S_IMODE(info.st_mode), b"")
        else:
            out[name] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return out


def test_a_normal_tree_unpacks_with_modes_and_implicit_parents(arena: Arena) -> None:
    target = unpack(arena, tar_of(
        DOCKERFILE,
        directory("src", mode=0o750),
        file("src/main.py", b"print(1)\n"),
        file("src/run.sh", b"#!/bin/sh\n", mode=0o755),
        file("src/suid", b"x", mode=0o4755),  # setuid dropped: root unpacks this
        file("deep/er/still/f.txt", b"deep"),  # parents the archive never listed
        directory("ro", mode=0o555),
        file("ro/inside", b"i"),  # written before ro/ turns read-only
    ))  # fmt: skip
    assert tree(target) == {
        "Dockerfile": ("file", 0o644, b"FROM scratch\n"),
        "deep": ("dir", 0o755, b""),
        "deep/er": ("dir", 0o755, b""),
        "deep/er/still": ("dir", 0o755, b""),
        "deep/er/still/f.txt": ("file", 0o644, b"deep"),
        "ro": ("dir", 0o555, b""),
        "ro/inside": ("file", 0o644, b"i"),
        "src": ("dir", 0o750, b""),
        "src/main.py": ("file", 0o644, b"print(1)\n"),
        "src/run.sh": ("file", 0o755, b"#!/bin/sh\n"),
        "src/suid": ("file", 0o755, b"x"),
    }
    assert (target / "src").stat().st_mtime == MTIME
    assert (target / "src/run.sh").stat().st_mtime == MTIME
    assert (target / "src/run.sh").stat().st_uid == os.getuid()


def test_in_tree_symlinks_are_kept_exactly(arena: Arena) -> None:
    links = {
        "to-file": "src/main.py",
        "to-dir": "src",
        "dot": ".",
        "odd/spelling": ".././src//main.py",
        "src/up": "../Dockerfile",
        "src/a/b/top": "../../../Dockerfile",
        "dangling": "not/there",  # docker keeps these too
    }
    target = unpack(arena, tar_of(
        DOCKERFILE, file("src/main.py", b"x"), *(symlink(n, t) for n, t in links.items())
    ))  # fmt: skip
    assert {name: os.readlink(target / name) for name in links} == links
    assert (target / "src/a/b/top").read_bytes() == b"FROM scratch\n"
    assert os.lstat(target / "src/up").st_mtime == MTIME


def test_hard_links_inside_the_tree_share_the_file(arena: Arena) -> None:
    target = unpack(arena, tar_of(file("d/f", b"data", mode=0o755), hardlink("d/g", "d/f"),
                                  hardlink("h", "./d/f")))  # fmt: skip
    inodes = {(target / name).stat().st_ino for name in ("d/f", "d/g", "h")}
    assert len(inodes) == 1
    assert (target / "h").read_bytes() == b"data"


def test_a_later_duplicate_replaces_the_earlier_entry(arena: Arena) -> None:
    target = unpack(arena, tar_of(file("f", b"old"), hardlink("g", "f"), file("f", b"new"),
                                  symlink("s", "f"), symlink("s", "g"), directory("d"),
                                  directory("d", mode=0o700)))  # fmt: skip
    assert (target / "f").read_bytes() == b"new"
    assert (target / "g").read_bytes() == b"old"  # as tar does: the link kept the old file
    assert os.readlink(target / "s") == "g"
    assert stat.S_IMODE((target / "d").stat().st_mode) == 0o700


def test_an_empty_archive_unpacks_to_nothing(arena: Arena) -> None:
    assert list(unpack(arena, tar_of()).iterdir()) == []


def test_a_dot_slash_archive_like_tar_c_dot(arena: Arena) -> None:
    # GNU `tar -C dir -c .` names: ./ for the root, ./sub/ for dirs
    target = unpack(arena, tar_of(
        directory("./"), file("./Dockerfile", b"FROM scratch\n"), directory("./sub/"),
        file("./sub/a", b"a"), symlink("./sub/l", "a"),
    ))  # fmt: skip
    assert tree(target) == {
        "Dockerfile": ("file", 0o644, b"FROM scratch\n"),
        "sub": ("dir", 0o755, b""),
        "sub/a": ("file", 0o644, b"a"),
        "sub/l": ("link", 0, "a"),
    }


def test_a_tree_packed_by_tarfile_and_by_the_client_round_trips(
    arena: Arena, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    (source / "bin").mkdir(parents=True)
    (source / "Dockerfile").write_bytes(b"FROM scratch\nCOPY . /\n")
    (source / "bin/tool").write_bytes(b"#!/bin/sh\n")
    (source / "bin/tool").chmod(0o755)
    (source / "bin/alias").symlink_to("tool")
    (source / "top").symlink_to("bin/tool")
    expected = tree(source)

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(source, arcname=".")  # ".", "./bin", ... like `tar -C src -c .`
    assert tree(unpack(arena, buffer.getvalue())) == expected

    packed = pack_context(source, spool_dir=tmp_path)
    second = tmp_path / "second"
    second.mkdir()
    try:
        unpack_context(packed.path, second)
    finally:
        packed.discard()
    assert tree(second) == expected


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_contexts_unpack(arena: Arena, compress: Callable[[bytes], bytes]) -> None:
    blob = compress(tar_of(DOCKERFILE, file("a/b", b"b", mode=0o600)))
    assert tree(unpack(arena, blob))["a/b"] == ("file", 0o600, b"b")


def test_a_target_that_is_not_empty_is_refused(arena: Arena) -> None:
    (arena.target / "leftover").write_bytes(b"x")
    arena.archive.write_bytes(tar_of(DOCKERFILE))
    with pytest.raises(ValueError, match="is not empty"):
        unpack_context(arena.archive, arena.target)
    assert [p.name for p in arena.target.iterdir()] == ["leftover"]


# ---- startup check and the no-extractall rule ------------------------------------------------


def test_check_tar_safety_names_the_unpack_path() -> None:
    line = check_tar_safety()
    assert "\n" not in line
    assert "validated extractor" in line


def test_check_tar_safety_refuses_a_platform_without_dir_fd_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "supports_dir_fd", set())
    with pytest.raises(RuntimeError, match="missing open/mkdir/symlink/link/unlink relative to"):
        check_tar_safety()


def extraction_calls(source: str) -> list[str]:
    """`extractall` anywhere and `.extract(` calls, in code (comments and strings don't count)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type in (tokenize.NAME, tokenize.OP)]  # fmt: skip
    found = []
    for i, token in enumerate(tokens):
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        before = tokens[i - 1].string if i else ""
        if token.string == "extractall" or (
            token.string == "extract" and before == "." and after == "("
        ):
            found.append(f"line {token.start[0]}: {token.line.strip()}")
    return found


def agent_sources() -> Iterator[Path]:
    for folder in polyarch.agent.__path__:
        yield from sorted(Path(folder).rglob("*.py"))


def test_the_scanner_finds_extraction_calls() -> None:
    assert extraction_calls("tar.extractall(path)\nt.extract (m)\n") == [
        "line 1: tar.extractall(path)",
        "line 2: t.extract (m)",
    ]
    assert extraction_calls("# tar.extractall(x)\ns = 'x.extract(y)'\nextract(z)\n") == []


def test_nothing_in_the_agent_calls_tarfile_extraction() -> None:
    sources = list(agent_sources())
    assert {"workspace.py", "context_unpack.py", "runtime.py"} <= {p.name for p in sources}
    found = {str(p): calls for p in sources if (calls := extraction_calls(p.read_text()))}
    assert found == {}

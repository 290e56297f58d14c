"""Native platform detection and QEMU binfmt_misc handler discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyarch.agent.detect import describe_binfmt, emulated_platforms, native_platform
from polyarch.proto.platforms import PlatformError, parse_platform

AMD64 = parse_platform("linux/amd64")
ARM64 = parse_platform("linux/arm64")


def write_handler(directory: Path, name: str, enabled: bool = True) -> None:
    state = "enabled" if enabled else "disabled"
    (directory / name).write_text(
        f"{state}\ninterpreter /usr/libexec/qemu-binfmt/{name}-binfmt-P\nflags: PF\n"
    )


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("aarch64", "linux/arm64"),
        ("armv7l", "linux/arm/v7"),
        ("ppc64le", "linux/ppc64le"),
    ],
)
def test_native_platform_from_machine(machine: str, expected: str) -> None:
    assert native_platform(machine) == parse_platform(expected)


def test_native_platform_defaults_to_this_machine() -> None:
    import platform

    assert native_platform() == native_platform(platform.machine())


def test_native_platform_rejects_unknown_machine() -> None:
    with pytest.raises(PlatformError):
        native_platform("vax")


def test_enabled_handlers_become_platforms(tmp_path: Path) -> None:
    (tmp_path / "status").write_text("enabled\n")
    write_handler(tmp_path, "qemu-aarch64")
    write_handler(tmp_path, "qemu-arm")
    write_handler(tmp_path, "qemu-s390x")
    write_handler(tmp_path, "qemu-riscv64")
    write_handler(tmp_path, "qemu-ppc64le")
    write_handler(tmp_path, "qemu-i386")
    write_handler(tmp_path, "qemu-mips")  # no OCI platform we schedule: ignored
    found = {str(p) for p in emulated_platforms(tmp_path, native=AMD64)}
    assert found == {
        "linux/arm64",
        "linux/arm/v7",
        "linux/arm/v6",
        "linux/s390x",
        "linux/riscv64",
        "linux/ppc64le",
        "linux/386",
    }


def test_disabled_handlers_are_ignored(tmp_path: Path) -> None:
    write_handler(tmp_path, "qemu-aarch64", enabled=False)
    write_handler(tmp_path, "qemu-arm")
    assert [str(p) for p in emulated_platforms(tmp_path, native=AMD64)] == [
        "linux/arm/v6",
        "linux/arm/v7",
    ]


def test_native_platform_is_never_emulated(tmp_path: Path) -> None:
    write_handler(tmp_path, "qemu-x86_64")
    write_handler(tmp_path, "qemu-aarch64")
    assert emulated_platforms(tmp_path, native=AMD64) == [ARM64]
    assert emulated_platforms(tmp_path, native=ARM64) == [AMD64]


def test_binfmt_switched_off_globally(tmp_path: Path) -> None:
    (tmp_path / "status").write_text("disabled\n")
    write_handler(tmp_path, "qemu-aarch64")
    assert emulated_platforms(tmp_path, native=AMD64) == []


def test_missing_binfmt_directory(tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    assert emulated_platforms(missing, native=AMD64) == []
    assert "not mounted" in describe_binfmt(missing)


def test_empty_or_unreadable_handler_is_not_enabled(tmp_path: Path) -> None:
    (tmp_path / "qemu-aarch64").write_text("")
    (tmp_path / "qemu-arm").mkdir()  # reading a directory fails: not enabled
    assert emulated_platforms(tmp_path, native=AMD64) == []


def test_describe_binfmt_lists_states(tmp_path: Path) -> None:
    write_handler(tmp_path, "qemu-aarch64")
    write_handler(tmp_path, "qemu-arm", enabled=False)
    summary = describe_binfmt(tmp_path)
    assert "qemu-aarch64=enabled" in summary
    assert "qemu-arm=disabled" in summary
    assert "qemu-s390x=absent" in summary


def test_default_directory_is_the_real_binfmt_misc() -> None:
    # On any machine: the call works and never reports the native platform.
    assert native_platform() not in emulated_platforms()

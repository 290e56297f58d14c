"""Detection of the platforms this agent runs natively and under QEMU user-mode emulation."""

from __future__ import annotations

import dataclasses
import platform as _platform
from pathlib import Path

from polyarch.agent.config import AgentConfig
from polyarch.proto.platforms import Platform, parse_platform, platform_from_uname

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")

# binfmt_misc handler name -> the platforms an enabled handler lets the kernel run.
QEMU_HANDLERS: dict[str, tuple[str, ...]] = {
    "qemu-aarch64": ("linux/arm64",),
    "qemu-arm": ("linux/arm/v7", "linux/arm/v6"),
    "qemu-ppc64le": ("linux/ppc64le",),
    "qemu-s390x": ("linux/s390x",),
    "qemu-riscv64": ("linux/riscv64",),
    "qemu-i386": ("linux/386",),
    "qemu-x86_64": ("linux/amd64",),
}


def native_platform(machine: str | None = None) -> Platform:
    """The platform this machine runs without emulation (`uname -m` when none is given)."""
    return platform_from_uname(machine if machine is not None else _platform.machine())


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return handle.readline().strip()
    except OSError:
        return ""


def emulated_platforms(
    binfmt_dir: Path = BINFMT_DIR, native: Platform | None = None
) -> list[Platform]:
    """Platforms runnable through enabled qemu binfmt_misc handlers, never the native one.

    A handler counts when its file's first line is `enabled` and binfmt_misc as a whole is
    not switched off (`status` reads `disabled`). Missing or unreadable directories give [].
    """
    if native is None:
        native = native_platform()
    if _first_line(binfmt_dir / "status") == "disabled":
        return []
    found: dict[Platform, None] = {}
    for handler, platforms in QEMU_HANDLERS.items():
        if _first_line(binfmt_dir / handler) != "enabled":
            continue
        for text in platforms:
            candidate = parse_platform(text)
            if candidate != native:
                found.setdefault(candidate, None)
    return sorted(found)


def describe_binfmt(binfmt_dir: Path = BINFMT_DIR) -> str:
    """A one-line summary of the qemu handlers for logs and error messages."""
    if not binfmt_dir.is_dir():
        return f"{binfmt_dir} is not mounted (mount -t binfmt_misc binfmt_misc {binfmt_dir})"
    states = []
    for handler in QEMU_HANDLERS:
        state = _first_line(binfmt_dir / handler) or "absent"
        states.append(f"{handler}={state}")
    return ", ".join(states)


def detect_platforms(config: AgentConfig) -> AgentConfig:
    """The config with native/emulated filled in from the machine where not configured."""
    native = config.native or [native_platform()]
    emulated = config.emulated if config.emulated is not None else emulated_platforms()
    emulated = [parse_platform(str(p)) for p in emulated]
    return dataclasses.replace(
        config, native=native, emulated=[p for p in emulated if p not in native]
    )

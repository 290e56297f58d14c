"""Parsing and normalisation of OCI platform strings (os/arch[/variant])."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Architecture spellings seen in the wild -> the GOARCH name OCI uses.
_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "i386": "386",
    "i686": "386",
}
# Variant an alias implies when none is given (armhf is v7, armel is v6).
_ALIAS_VARIANT = {"armhf": "v7", "armel": "v6", "aarch64": "v8"}

KNOWN_OS = frozenset({"linux", "windows", "freebsd", "darwin"})
KNOWN_ARCH_VARIANTS: dict[str, frozenset[str]] = {
    "amd64": frozenset({"v1", "v2", "v3", "v4"}),
    "arm64": frozenset({"v8", "v8.0", "v8.1", "v8.2", "v9"}),
    "arm": frozenset({"v5", "v6", "v7", "v8"}),
    "386": frozenset(),
    "ppc64le": frozenset(),
    "s390x": frozenset(),
    "riscv64": frozenset(),
    "mips64le": frozenset(),
    "loong64": frozenset(),
}
# The variant that is the default and therefore dropped: linux/arm64/v8 == linux/arm64.
_DEFAULT_VARIANT = {"amd64": "v1", "arm64": "v8", "arm": "v7"}

_COMPONENT = re.compile(r"^[a-z0-9._-]+$")


class PlatformError(ValueError):
    """A platform string that is malformed or names an unknown OS/architecture."""


@dataclass(frozen=True, order=True)
class Platform:
    """A normalised platform; `str()` gives its canonical spelling."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        parts = [self.os, self.architecture]
        if self.variant:
            parts.append(self.variant)
        return "/".join(parts)

    @property
    def oci_variant(self) -> str:
        """The variant as it belongs in an image index entry (arm always carries one)."""
        if self.architecture == "arm":
            return self.variant or "v7"
        if self.architecture == "arm64":
            return self.variant or "v8"
        return self.variant

    @property
    def slug(self) -> str:
        """A spelling usable in tags and file names: linux-arm-v7."""
        return str(self).replace("/", "-")


def parse_platform(text: str) -> Platform:
    """Parses and normalises one platform, raising PlatformError naming the problem."""
    raw = text.strip().lower()
    if not raw:
        raise PlatformError("empty platform: expected os/arch[/variant], e.g. linux/amd64")
    parts = raw.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise PlatformError(
            f"malformed platform {text!r}: expected os/arch[/variant], e.g. linux/arm64"
        )
    for part in parts:
        if not _COMPONENT.match(part):
            raise PlatformError(f"malformed platform {text!r}: {part!r} has invalid characters")
    os_name, arch = parts[0], parts[1]
    variant = parts[2] if len(parts) == 3 else _ALIAS_VARIANT.get(arch, "")
    arch = _ARCH_ALIASES.get(arch, arch)
    if os_name not in KNOWN_OS:
        raise PlatformError(
            f"unknown operating system {os_name!r} in platform {text!r} "
            f"(known: {', '.join(sorted(KNOWN_OS))})"
        )
    if arch not in KNOWN_ARCH_VARIANTS:
        raise PlatformError(
            f"unknown architecture {arch!r} in platform {text!r} "
            f"(known: {', '.join(sorted(KNOWN_ARCH_VARIANTS))})"
        )
    if variant and variant not in KNOWN_ARCH_VARIANTS[arch]:
        allowed = ", ".join(sorted(KNOWN_ARCH_VARIANTS[arch])) or "none"
        raise PlatformError(
            f"unknown variant {variant!r} for {arch} in platform {text!r} (known: {allowed})"
        )
    if variant == _DEFAULT_VARIANT.get(arch) and arch != "arm":
        variant = ""
    if arch == "arm" and not variant:
        variant = "v7"
    return Platform(os_name, arch, variant)


def parse_platforms(texts: list[str] | str) -> list[Platform]:
    """Parses a list (or comma-separated string) of platforms, dropping duplicates, in order."""
    items = texts.split(",") if isinstance(texts, str) else [p for t in texts for p in t.split(",")]
    seen: dict[Platform, None] = {}
    for item in items:
        if item.strip():
            seen.setdefault(parse_platform(item), None)
    if not seen:
        raise PlatformError("no platform given")
    return list(seen)


def platform_from_uname(machine: str) -> Platform:
    """The linux platform of a `uname -m` machine name (x86_64, aarch64, armv7l...)."""
    machine = machine.strip().lower()
    table = {
        "x86_64": "linux/amd64",
        "amd64": "linux/amd64",
        "aarch64": "linux/arm64",
        "arm64": "linux/arm64",
        "armv7l": "linux/arm/v7",
        "armv6l": "linux/arm/v6",
        "i686": "linux/386",
        "i386": "linux/386",
        "ppc64le": "linux/ppc64le",
        "s390x": "linux/s390x",
        "riscv64": "linux/riscv64",
    }
    if machine not in table:
        raise PlatformError(f"unsupported machine type {machine!r}")
    return parse_platform(table[machine])

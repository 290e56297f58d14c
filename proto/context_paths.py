"""The path rules every build context obeys, as a tar or a manifest: nothing leaves the tree."""

from __future__ import annotations

import os

MAX_DEPTH = 64
MAX_COMPONENT_BYTES = 255  # NAME_MAX
MAX_PATH_BYTES = 4096  # PATH_MAX


class PathRuleError(ValueError):
    """A path or symlink target that breaks a rule; the message is the rule, said of the path."""


def split_path(path: str, what: str = "") -> tuple[str, ...]:
    """The path's components with "" and "." dropped; refuses what could leave the tree.

    `what` prefixes each message (e.g. "hard link target 'x' ")."""
    if "\x00" in path:
        raise PathRuleError(f"{what}contains a NUL byte")
    if path.startswith("/"):
        raise PathRuleError(f"{what}is an absolute path")
    parts = tuple(part for part in path.split("/") if part not in ("", "."))
    if ".." in parts:
        raise PathRuleError(f"{what}has a '..' component")
    if len(parts) > MAX_DEPTH:
        raise PathRuleError(f"{what}is {len(parts)} levels deep, over the limit of {MAX_DEPTH}")
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise PathRuleError(f"{what}is longer than {MAX_PATH_BYTES} bytes")
    for part in parts:
        if len(os.fsencode(part)) > MAX_COMPONENT_BYTES:
            raise PathRuleError(f"{what}has a component longer than {MAX_COMPONENT_BYTES} bytes")
    return parts


def check_symlink(parts: tuple[str, ...], target: str, anywhere: bool = False) -> None:
    """Allows relative targets like ../../a/b that stay inside the tree (any target with
    `anywhere`); `parts` is the link's own path.

    The link's directory is real (nothing is written through a symlink), so leading '..'
    climb real directories and are counted against its depth. A '..' after a name would
    climb from wherever another symlink led (CVE-2025-4517's chains), so it is refused.
    """
    if not target:
        raise PathRuleError("is a symlink with an empty target")
    if "\x00" in target:
        raise PathRuleError("is a symlink whose target contains a NUL byte")
    if len(os.fsencode(target)) >= MAX_PATH_BYTES:
        raise PathRuleError(f"is a symlink whose target is {MAX_PATH_BYTES} bytes or longer")
    if anywhere:
        return
    if target.startswith("/"):
        raise PathRuleError(
            f"is a symlink to the absolute path {target!r}; targets must be relative"
        )
    ups = 0
    descended = False
    for part in target.split("/"):
        if part == "..":
            if descended:
                raise PathRuleError(
                    f"is a symlink to {target!r}, which has '..' after a name; "
                    "only leading '..' are allowed"
                )
            ups += 1
        elif part not in ("", "."):
            descended = True
    if ups > len(parts) - 1:
        raise PathRuleError(f"is a symlink to {target!r}, which points outside the context")

"""An image's root filesystem from its layers: applied bottom to top, whiteouts honoured."""

from __future__ import annotations

import copy
import posixpath
import tarfile
from collections.abc import Sequence
from pathlib import Path

# OCI image-spec layer changesets: `.wh.NAME` deletes NAME from the layers below, and
# `.wh..wh..opq` in a folder hides everything the layers below put in it.
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def member_path(name: str) -> str:
    """A tar member's path as the root filesystem names it ("usr/bin/env"), "" for the root
    itself. Resolved from "/", so a `..` stops at the root as it does in the kernel."""
    path = posixpath.normpath("/" + name).lstrip("/")
    return "" if path == "." else path


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class _UpperLayers:
    """What the layers above the one being read have decided."""

    def __init__(self) -> None:
        self.claimed: dict[str, bool] = {}  # path -> whether it is a folder
        self.removed: set[str] = set()
        self.opaque: set[str] = set()

    def hides(self, path: str) -> bool:
        if path in self.claimed or path in self.removed:
            return True
        for ancestor in _ancestors(path):
            if ancestor in self.removed or ancestor in self.opaque:
                return True
            if self.claimed.get(ancestor) is False:  # a file above replaced this folder
                return True
        return False


def visible_entries(layers: Sequence[Path]) -> list[set[str]]:
    """For each layer (bottom first), the paths whose entry in that layer is the one the
    root filesystem shows. Reads the layers top first: an upper entry wins."""
    upper = _UpperLayers()
    visible: list[set[str]] = [set() for _ in layers]
    for index in reversed(range(len(layers))):
        removed_here: set[str] = set()
        opaque_here: set[str] = set()
        with tarfile.open(layers[index], "r:*") as tar:
            for member in tar:
                path = member_path(member.name)
                if not path:
                    continue
                folder, _, base = path.rpartition("/")
                if base == OPAQUE_MARKER:
                    opaque_here.add(folder)
                elif base.startswith(WHITEOUT_PREFIX):
                    removed_here.add(posixpath.join(folder, base[len(WHITEOUT_PREFIX) :]))
                elif not upper.hides(path):
                    upper.claimed[path] = member.isdir()
                    visible[index].add(path)
        # a layer's whiteouts apply to the layers below it, never to itself
        upper.removed |= removed_here
        upper.opaque |= opaque_here
    return visible


def write_rootfs(layers: Sequence[Path], out: tarfile.TarFile, prefix: str = "") -> int:
    """Writes the root filesystem of `layers` (bottom first, each a tar, compressed or not)
    into `out`, every path under `prefix` ("linux_arm64/", or "" for none); returns the
    number of entries. Two passes: which entry wins is known only once the layers above a
    path have been read, and a tar stream is written once, in order."""
    visible = visible_entries(layers)
    if prefix:
        folder = tarfile.TarInfo(prefix.rstrip("/"))
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        out.addfile(folder)
    written = 0
    for index, layer in enumerate(layers):
        keep = visible[index]
        with tarfile.open(layer, "r:*") as tar:
            for member in tar:
                path = member_path(member.name)
                if path not in keep:
                    continue
                entry = copy.copy(member)
                entry.name = prefix + path
                if member.islnk():
                    # hard links name a path of the same filesystem: under the prefix too
                    entry.linkname = prefix + member_path(member.linkname)
                out.addfile(entry, tar.extractfile(member) if member.isreg() else None)
                written += 1
    return written

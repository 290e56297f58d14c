"""What the agent's context cache holds and what it still needs: tars, manifests and their blobs.

Cached manifests were validated by ContextManifest.decode() before they were written, so
their canonical form (sorted keys: a file line starts with its digest, mode and mtime and
ends with its size and type) is read here with a regular expression, at C speed, rather
than decoded again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from polyarch.agent.blob_cache import variant_name
from polyarch.coordinator.contexts.store import StoredContext

TAR_SUFFIX = ".tar"
MANIFEST_SUFFIX = ".manifest"
_FILE_HEAD = re.compile(rb'^\{"digest":"sha256:([0-9a-f]{64})","mode":(\d+),"mtime":(-?\d+),', re.M)
# the path is a JSON string: an unescaped '"' cannot occur in it, so the line's tail is this
_FILE_SIZE = re.compile(rb',"size":(\d+),"type":"file"\}$', re.M)


def manifest_weight(encoded: bytes) -> int:
    """The disk a manifest context takes in the cache: the manifest and each file's size
    once (a blob's inode is its first variant; more variants are copies). Contexts
    sharing blobs are each counted in full, so the budget errs towards trimming."""
    return len(encoded) + sum(int(size) for size in _FILE_SIZE.findall(encoded))


def references(encoded: bytes) -> tuple[set[str], set[str]]:
    """The blob hex digests and variant names a cached manifest uses."""
    blobs: set[str] = set()
    variants: set[str] = set()
    for hexdigest, mode, mtime in _FILE_HEAD.findall(encoded):
        blobs.add(hexdigest.decode())
        variants.add(variant_name(hexdigest.decode(), int(mode), int(mtime)))
    return blobs, variants


def cached_contexts(contexts: Path, weights: dict[str, int]) -> list[StoredContext]:
    """Every cached tar and manifest, sized in bytes, last used at its mtime. `weights`
    remembers manifest weights (digest -> bytes) so each manifest is read once."""
    entries = []
    for item in os.scandir(contexts):
        name = item.name
        if name.endswith(TAR_SUFFIX):
            digest = "sha256:" + name.removesuffix(TAR_SUFFIX)
        elif name.endswith(MANIFEST_SUFFIX):
            digest = "sha256:" + name.removesuffix(MANIFEST_SUFFIX)
        else:
            continue  # a download in progress
        try:
            info = item.stat(follow_symlinks=False)
            size = info.st_size
            if name.endswith(MANIFEST_SUFFIX):
                if digest not in weights:
                    weights[digest] = manifest_weight(Path(item.path).read_bytes())
                size = weights[digest]
        except FileNotFoundError:
            continue
        entries.append(StoredContext(digest, size, info.st_mtime))
    return entries


def referenced_by_manifests(contexts: Path) -> tuple[set[str], set[str]]:
    """The blobs and variants every cached manifest uses (O(all their files): run rarely)."""
    blobs: set[str] = set()
    variants: set[str] = set()
    for path in contexts.glob("*" + MANIFEST_SUFFIX):
        try:
            more_blobs, more_variants = references(path.read_bytes())
        except FileNotFoundError:
            continue
        blobs |= more_blobs
        variants |= more_variants
    return blobs, variants

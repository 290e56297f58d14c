"""Blobs of any size from a registry into files, checked against their digest on the way."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

from polyarch.coordinator.registry.client import DigestMismatch, RegistryClient


class Described(Protocol):
    """What a download needs to know of a blob: its digest and size in bytes."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...


async def download_blob(
    client: RegistryClient, registry: str, repository: str, blob: Described, dest: Path
) -> None:
    """Writes the blob to `dest` (its folders made), through a temporary name, so `dest`
    exists only once its size and sha256 are right. An existing `dest` is kept: a blob's
    name is its digest, so it can hold nothing else."""
    if dest.exists():  # noqa: ASYNC240 (a stat; the download below is the slow part)
        return
    algorithm, _, expected = blob.digest.partition(":")
    if algorithm != "sha256":
        raise DigestMismatch(f"{registry}/{repository}: {blob.digest}: not sha256", registry)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    size = 0
    try:
        with partial.open("wb") as out:
            async with client.stream_blob(registry, repository, blob.digest) as body:
                async for chunk in body.aiter_raw():
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        if size != blob.size or digest.hexdigest() != expected:
            raise DigestMismatch(
                f"{registry}/{repository}: blob {blob.digest} ({blob.size} bytes) arrived as "
                f"sha256:{digest.hexdigest()} ({size} bytes)",
                registry,
            )
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)

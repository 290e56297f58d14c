"""The images of a finished build, fetched from the registry into a folder, verified."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from polyarch.coordinator.core.model import PolyarchError
from polyarch.coordinator.registry.client import RegistryClient
from polyarch.coordinator.registry.downloads import download_blob
from polyarch.proto.media_types import IMAGE_MANIFEST_TYPES
from polyarch.proto.platforms import Platform

# Layer compressions `tarfile` reads; zstd layers are refused (no reader in the stdlib).
READABLE_LAYERS = ("tar", "tar+gzip", "diff.tar", "diff.tar.gzip", "rootfs.diff.tar.gzip")


class ExportError(PolyarchError):
    """An export that cannot be made from what the registry holds, named with the reason."""


@dataclass(frozen=True)
class Blob:
    """A blob as an OCI descriptor names it: media type, digest and size in bytes."""

    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class FetchedImage:
    """One platform's image: manifest and config in memory, layers in files, bottom first."""

    platform: Platform
    manifest: Blob
    manifest_bytes: bytes
    config: Blob
    config_bytes: bytes
    layers: tuple[Blob, ...]

    def documents(self) -> dict[str, bytes]:
        return {self.manifest.digest: self.manifest_bytes, self.config.digest: self.config_bytes}


def blob_path(folder: Path, digest: str) -> Path:
    algorithm, _, hex_part = digest.partition(":")
    return folder / "blobs" / algorithm / hex_part


def _layer_readable(media_type: str) -> bool:
    return any(media_type.endswith("." + suffix) for suffix in READABLE_LAYERS)


async def fetch_images(
    client: RegistryClient,
    where: tuple[str, str],
    manifests: Mapping[Platform, str],
    folder: Path,
    need_readable_layers: bool = False,
) -> list[FetchedImage]:
    """Each platform's manifest, config and layers from registry/repository `where`, into
    `folder`'s blobs/sha256/ (a layer two platforms share is downloaded once). Every byte is
    checked against its digest on the way in."""
    registry, repository = where
    images: list[FetchedImage] = []
    layers: dict[str, Blob] = {}
    for platform, digest in manifests.items():
        body, found = await client.get_manifest(registry, repository, digest)
        if found.media_type not in IMAGE_MANIFEST_TYPES:
            raise ExportError(f"{platform}: {digest} is a {found.media_type}, not an image")
        document = json.loads(body)
        config = _blob(document["config"])
        config_bytes = await client.get_blob(registry, repository, config.digest)
        own = tuple(_blob(layer) for layer in document.get("layers", []))
        for layer in own:
            if need_readable_layers and not _layer_readable(layer.media_type):
                raise ExportError(
                    f"{platform}: layer {layer.digest} is {layer.media_type}; filesystem "
                    "exports read tar and gzip layers only"
                )
            layers.setdefault(layer.digest, layer)
        manifest = Blob(found.media_type, found.digest, found.size)
        images.append(FetchedImage(platform, manifest, body, config, config_bytes, own))
    await asyncio.gather(
        *(
            download_blob(client, registry, repository, layer, blob_path(folder, layer.digest))
            for layer in layers.values()
        )
    )
    return images


def _blob(descriptor: Mapping[str, object]) -> Blob:
    return Blob(
        str(descriptor["mediaType"]), str(descriptor["digest"]), int(str(descriptor["size"]))
    )


async def fetch_attestations(
    client: RegistryClient, where: tuple[str, str], digests: Sequence[str]
) -> dict[str, bytes]:
    """Attestation manifests with their config and layers (small JSON documents), by digest:
    the blobs an OCI layout needs for the index entries that name them."""
    registry, repository = where
    documents: dict[str, bytes] = {}
    for digest in digests:
        body, found = await client.get_manifest(registry, repository, digest)
        documents[found.digest] = body
        document = json.loads(body)
        for blob in [document.get("config") or {}, *(document.get("layers") or [])]:
            if blob.get("digest"):
                blob_digest = str(blob["digest"])
                documents[blob_digest] = await client.get_blob(registry, repository, blob_digest)
    return documents

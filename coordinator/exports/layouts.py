"""OCI image layouts and `docker load` archives written from fetched images, as tar streams."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from polyarch.coordinator.exports.images import Blob, FetchedImage, blob_path
from polyarch.proto.media_types import OCI_INDEX
from polyarch.proto.references import parse_reference

LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
# What BuildKit's oci and docker exporters annotate the top descriptor with.
IMAGE_NAME = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"


def add_bytes(out: tarfile.TarFile, name: str, data: bytes) -> None:
    entry = tarfile.TarInfo(name)
    entry.size, entry.mode = len(data), 0o644
    out.addfile(entry, io.BytesIO(data))


def _add_blobs(
    out: tarfile.TarFile, images: Sequence[FetchedImage], folder: Path, extra: dict[str, bytes]
) -> None:
    """Every blob once: documents from memory, layers from the download folder."""
    documents = dict(extra)
    for image in images:
        documents.update(image.documents())
    for digest, data in documents.items():
        add_bytes(out, str(blob_path(Path(), digest)), data)
    seen: set[str] = set()
    for image in images:
        for layer in image.layers:
            if layer.digest not in seen:
                seen.add(layer.digest)
                out.add(blob_path(folder, layer.digest), str(blob_path(Path(), layer.digest)))


def _top_descriptor(top: Blob, names: Sequence[str]) -> dict[str, object]:
    descriptor = top.descriptor()
    if names:
        reference = parse_reference(names[0])
        descriptor["annotations"] = {IMAGE_NAME: names[0], REF_NAME: reference.tag or "latest"}
    return descriptor


def write_oci_layout(
    out: tarfile.TarFile,
    images: Sequence[FetchedImage],
    folder: Path,
    index: tuple[Blob, bytes] | None,
    names: Sequence[str] = (),
    documents: Mapping[str, bytes] | None = None,
) -> None:
    """An OCI image layout (image-spec image-layout.md) in `out`. Its index.json names the
    build's image index when given (several platforms), else the one image's manifest, as
    BuildKit's oci exporter does. `documents` are further blobs by digest (attestations)."""
    extra = {**(documents or {}), **({index[0].digest: index[1]} if index else {})}
    top = index[0] if index else images[0].manifest
    add_bytes(out, "oci-layout", LAYOUT_VERSION)
    _add_blobs(out, images, folder, extra)
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": [_top_descriptor(top, names)]}  # fmt: skip
    add_bytes(out, "index.json", json.dumps(document, indent=None).encode())


def write_docker_archive(
    out: tarfile.TarFile, image: FetchedImage, folder: Path, names: Sequence[str] = ()
) -> None:
    """One image as `docker load` reads it: manifest.json (config, tags, layers) over the
    same files as an OCI layout, so OCI tools read it as well (BuildKit's docker exporter
    writes both)."""
    write_oci_layout(out, [image], folder, None, names)
    entry = {
        "Config": str(blob_path(Path(), image.config.digest)),
        "RepoTags": list(names),
        "Layers": [str(blob_path(Path(), layer.digest)) for layer in image.layers],
    }
    add_bytes(out, "manifest.json", json.dumps([entry]).encode())

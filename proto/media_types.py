"""Manifest media types: the one list for the registry client, the builders and the CLI."""

from __future__ import annotations

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

# What one platform's image is pushed as: the only types a job result may report.
IMAGE_MANIFEST_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
# What points at per-platform images: the types an assembled build publishes.
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
# The Accept header of a manifest read: every type above, images and indexes alike.
MANIFEST_ACCEPT = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX)

"""Removing a published build's per-job staging tags, where the registry allows deletes."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from polyarch.coordinator.registry.client import ManifestNotFound, RegistryClient, RegistryError
from polyarch.proto.media_types import OCI_MANIFEST

log = logging.getLogger(__name__)

# OCI's empty descriptor (image-spec 1.1): the config of a manifest that holds nothing.
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONTENT = b"{}"
# Registries that refuse deletes answer one of these (distribution: 405 when disabled).
DELETES_OFF = frozenset({400, 403, 405})


def throwaway_manifest(config_digest: str, build_id: str) -> bytes:
    """A manifest of nothing, of this build only (its annotation makes its digest unique)."""
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": config_digest, "size": 2},
        "layers": [],
        "annotations": {"org.polyarch.staging-of": build_id},
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


async def remove_staging_tags(
    client: RegistryClient, registry: str, repository: str, build_id: str, tags: Iterable[str]
) -> str:
    """Removes the staging tags; returns "" or why they stay.

    Many registries delete manifests only by digest, and deleting the image a staging tag
    names would break the index that references it. So each staging tag is first pointed at
    a throwaway manifest of this build, and that manifest is deleted: the tags go with it,
    and the images the index references are never touched."""
    tags = list(tags)
    config = await client.put_blob(registry, repository, EMPTY_CONTENT)
    body = throwaway_manifest(config, build_id)
    digest = ""
    for tag in tags:
        digest = await client.put_manifest(registry, repository, tag, body, OCI_MANIFEST)
    try:
        await client.delete_manifest(registry, repository, digest)
    except ManifestNotFound:
        pass  # already gone: nothing left to remove
    except RegistryError as exc:
        if exc.status not in DELETES_OFF:
            raise
        why = (
            f"{registry}/{repository} does not allow deletes ({exc}); its {len(tags)} staging "
            "tags now point at an empty manifest"
        )
        log.info("build %s: %s", build_id, why)
        return why
    return ""

"""Publishing one built index to more repositories: copies by digest, blobs mounted when
the registry allows and streamed across registries when not, every tag read back."""

from __future__ import annotations

import json
from collections.abc import Sequence

from polyarch.coordinator.registry.client import RegistryClient
from polyarch.coordinator.registry.index import ChildManifest, Sign, VerificationError
from polyarch.proto.references import parse_reference

Repository = tuple[str, str]  # (registry, repository)


def tags_by_repository(tags: Sequence[str]) -> dict[Repository, list[str]]:
    """The build's (normalised) tags grouped by repository, in the order they came."""
    groups: dict[Repository, list[str]] = {}
    for tag in tags:
        ref = parse_reference(tag)
        groups.setdefault((ref.registry, ref.repository), []).append(ref.tag or "latest")
    return groups


async def copy_image(
    client: RegistryClient, source: Repository, target: Repository, digest: str
) -> list[str]:
    """Copies one image manifest and its blobs by digest; returns how each blob got there."""
    body, descriptor = await client.get_manifest(source[0], source[1], digest)
    manifest = json.loads(body)
    blobs = [manifest.get("config") or {}, *(manifest.get("layers") or [])]
    how = []
    for blob in blobs:
        if blob.get("digest"):
            how.append(await client.copy_blob(source, target, str(blob["digest"])))
    await client.put_manifest(target[0], target[1], digest, body, descriptor.media_type)
    return how


async def publish_copy(
    client: RegistryClient,
    source: Repository,
    target: Repository,
    children: Sequence[ChildManifest],
    index: tuple[bytes, str, str],
    tags: Sequence[str],
    sign: Sign | None = None,
) -> list[str]:
    """Puts every child, then the index (body, media type, digest) by digest, signs it for
    `target` (the signature names that repository), then puts it under `tags` and reads
    every tag back; returns how each blob got there (for the log)."""
    body, media_type, digest = index
    how: list[str] = []
    for child in children:
        how += await copy_image(client, source, target, child.digest)
        if child.attestation is not None:  # the index names it: it has to be there too
            how += await copy_image(client, source, target, child.attestation.digest)
    await client.put_manifest(target[0], target[1], digest, body, media_type)
    if sign is not None:
        await sign(target[0], target[1], digest)
    for tag in tags:
        await client.put_manifest(target[0], target[1], tag, body, media_type)
    for tag in tags:
        _, read = await client.get_manifest(target[0], target[1], tag)
        if read.digest != digest:
            raise VerificationError(
                f"{target[0]}/{target[1]}:{tag} reads back as {read.digest}, but we pushed {digest}"
            )
    return how

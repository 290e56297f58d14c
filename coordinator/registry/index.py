"""Image index assembly: verify each platform's manifest, render the index, push and read back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from polyarch.coordinator.registry.annotations import IndexAnnotations, annotated
from polyarch.coordinator.registry.client import RegistryClient, compute_digest
from polyarch.proto.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from polyarch.proto.platforms import Platform, PlatformError, parse_platform
from polyarch.proto.references import TAG_PATTERN, is_digest

ATTESTATION_ANNOTATION = "vnd.docker.reference.type"
ATTESTATION_TYPE = "attestation-manifest"
ATTESTATION_SUBJECT = "vnd.docker.reference.digest"


class VerificationError(Exception):
    """The registry does not hold what an agent reported, or the pushed index reads back wrong."""


class PlatformMismatch(VerificationError):
    """A child image whose config names a different platform than the job built for."""


class DuplicatePlatform(ValueError):
    """Two children of one index claim the same platform."""


@dataclass(frozen=True)
class Attestation:
    """An attestation manifest (BuildKit's storage format) for one platform's image."""

    digest: str
    size: int
    media_type: str = OCI_MANIFEST


@dataclass(frozen=True)
class ChildManifest:
    """One per-platform image manifest as it will appear in the index, with its attestation
    manifest when it has one."""

    platform: Platform
    digest: str
    media_type: str
    size: int
    config_digest: str = ""
    attestation: Attestation | None = None


@dataclass(frozen=True)
class IndexResult:
    """The pushed index: its digest, media type, size in bytes and its children."""

    digest: str
    media_type: str
    size: int
    children: tuple[ChildManifest, ...]


# Pushes an attestation manifest per verified child; returns the children carrying them.
Attach = Callable[[Sequence[ChildManifest]], Awaitable[Sequence[ChildManifest]]]
# Signs (registry, repository, index digest): called once the index is in the repository by
# digest, before any of its tags moves there (registry/signatures.py).
Sign = Callable[[str, str, str], Awaitable[None]]


def index_media_type(
    children: Sequence[ChildManifest], annotations: IndexAnnotations | None = None
) -> str:
    """A Docker manifest list when every child is a Docker manifest and nothing is annotated
    or attested, an OCI index otherwise."""
    plain = not annotations and not any(child.attestation for child in children)
    if plain and children and all(child.media_type == DOCKER_MANIFEST for child in children):
        return DOCKER_MANIFEST_LIST
    return OCI_INDEX


def platform_json(platform: Platform) -> dict[str, str]:
    """The `platform` object of an index entry (arm always carries its variant)."""
    variant = platform.oci_variant if platform.architecture == "arm" else platform.variant
    entry = {"architecture": platform.architecture, "os": platform.os}
    if variant:
        entry["variant"] = variant
    return entry


def render_index(
    children: Sequence[ChildManifest], annotations: IndexAnnotations | None = None
) -> bytes:
    """Canonical index JSON (sorted keys, no whitespace, entries sorted by platform); with
    annotations always an OCI index (a Docker manifest list has no annotations)."""
    annotations = annotations or IndexAnnotations()
    if not children:
        raise ValueError("an image index needs at least one child manifest")
    seen: set[Platform] = set()
    for child in children:
        if child.platform in seen:
            raise DuplicatePlatform(f"two child manifests for platform {child.platform}")
        seen.add(child.platform)
    manifests = [
        annotated(
            {
                "mediaType": child.media_type,
                "digest": child.digest,
                "size": child.size,
                "platform": platform_json(child.platform),
            },
            annotations.for_entry(child.platform),
        )
        for child in sorted(children, key=lambda c: str(c.platform))
    ]
    # after every image, as BuildKit: a client that takes the first match never meets one
    ordered = sorted(children, key=lambda c: str(c.platform))
    manifests += [attestation_entry(child) for child in ordered if child.attestation]
    document = annotated(
        {
            "schemaVersion": 2,
            "mediaType": index_media_type(children, annotations),
            "manifests": manifests,
        },
        annotations.index,
    )
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")


def attestation_entry(child: ChildManifest) -> dict[str, Any]:
    """The index entry of a child's attestation manifest: platform unknown/unknown, and the
    annotations that tie it to the child (BuildKit's attestation storage)."""
    assert child.attestation is not None
    return {
        "mediaType": child.attestation.media_type,
        "digest": child.attestation.digest,
        "size": child.attestation.size,
        "platform": {"architecture": "unknown", "os": "unknown"},
        "annotations": {
            ATTESTATION_ANNOTATION: ATTESTATION_TYPE,
            ATTESTATION_SUBJECT: child.digest,
        },
    }


def attestation_of(index: Mapping[str, Any], digest: str) -> Attestation | None:
    """The attestation manifest an index holds for its entry `digest`, if any."""
    for entry in index.get("manifests") or []:
        annotations = (entry.get("annotations") or {}) if isinstance(entry, dict) else {}
        if annotations.get(ATTESTATION_ANNOTATION) != ATTESTATION_TYPE:
            continue
        if annotations.get(ATTESTATION_SUBJECT) == digest and is_digest(entry.get("digest", "")):
            media_type = str(entry.get("mediaType") or OCI_MANIFEST)
            return Attestation(str(entry["digest"]), int(entry.get("size") or 0), media_type)
    return None


def config_platform(config: Mapping[str, Any]) -> Platform:
    """The normalised platform an image config declares (arm without a variant is v7)."""
    os_name = str(config.get("os") or "")
    arch = str(config.get("architecture") or "")
    variant = str(config.get("variant") or "")
    text = "/".join(part for part in (os_name, arch, variant) if part)
    return parse_platform(text)


def is_attestation(entry: Mapping[str, Any]) -> bool:
    """True for BuildKit attestation manifests (annotation, or platform unknown/unknown)."""
    annotations = entry.get("annotations") or {}
    if annotations.get(ATTESTATION_ANNOTATION) == ATTESTATION_TYPE:
        return True
    platform = entry.get("platform") or {}
    return platform.get("os") == "unknown" or platform.get("architecture") == "unknown"


def pick_platform_entry(
    index: Mapping[str, Any], expected: Platform, where: str
) -> Mapping[str, Any]:
    """The single non-attestation entry of an index whose platform is `expected`."""
    matches = []
    for entry in index.get("manifests") or []:
        if not isinstance(entry, dict) or is_attestation(entry):
            continue
        try:
            platform = config_platform(entry.get("platform") or {})
        except PlatformError:
            continue
        if platform == expected:
            matches.append(entry)
    if len(matches) != 1:
        problem = "no entry" if not matches else f"{len(matches)} entries"
        raise PlatformMismatch(f"{where}: child index has {problem} for platform {expected}")
    return matches[0]


def _load_json(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VerificationError(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise VerificationError(f"{what} is not a JSON object")
    return data


async def resolve_child(
    client: RegistryClient,
    registry: str,
    repository: str,
    digest: str,
    expected: Platform,
    *,
    _depth: int = 0,
) -> ChildManifest:
    """Fetches a child by digest from the target repository and checks its platform.

    An image manifest's config must declare `expected`; a child index (BuildKit with
    attestations) is flattened to its single non-attestation entry for `expected`.
    """
    if not is_digest(digest):
        raise VerificationError(f"child for {expected} has malformed digest {digest!r}")
    expected = parse_platform(str(expected))
    where = f"{registry}/{repository}@{digest}"
    body, descriptor = await client.get_manifest(registry, repository, digest)
    manifest = _load_json(body, f"manifest {where}")
    media_type = str(manifest.get("mediaType") or descriptor.media_type)
    if media_type in INDEX_TYPES:
        if _depth > 0:
            raise VerificationError(f"{where}: nested image index inside a child index")
        entry = pick_platform_entry(manifest, expected, where)
        child = await resolve_child(
            client, registry, repository, str(entry.get("digest")), expected, _depth=1
        )
        # BuildKit's own attestation for the image travels with it into our index
        return replace(child, attestation=attestation_of(manifest, child.digest))
    if media_type not in IMAGE_MANIFEST_TYPES:
        raise VerificationError(f"{where}: unsupported manifest media type {media_type!r}")
    config_digest = str((manifest.get("config") or {}).get("digest") or "")
    if not is_digest(config_digest):
        raise VerificationError(f"{where}: manifest has no valid config digest")
    config = _load_json(
        await client.get_blob(registry, repository, config_digest), f"config of {where}"
    )
    try:
        actual = config_platform(config)
    except PlatformError as exc:
        raise PlatformMismatch(
            f"{where}: expected platform {expected}, config says {exc}"
        ) from None
    if actual != expected:
        raise PlatformMismatch(
            f"{where}: expected platform {expected} but the image config says {actual}"
        )
    return ChildManifest(expected, descriptor.digest, media_type, descriptor.size, config_digest)


async def assemble_index(
    client: RegistryClient,
    registry: str,
    repository: str,
    children: Mapping[Platform, str],
    tags: Sequence[str],
    annotations: IndexAnnotations | None = None,
    push: bool = True,
    attest: Attach | None = None,
    sign: Sign | None = None,
) -> IndexResult:
    """Verifies every child, pushes the index by digest, signs it, then pushes it under
    every tag and reads each tag back; with push=False only verifies, and the result names
    the index that would have been pushed. `attest` gets the verified children and returns
    them with their attestations pushed."""
    if push and not tags:
        raise ValueError("assemble_index needs at least one tag to push to")
    for tag in tags:
        if not TAG_PATTERN.match(tag):
            raise ValueError(f"invalid tag {tag!r}")
    resolved = await asyncio.gather(
        *(
            resolve_child(client, registry, repository, digest, platform)
            for platform, digest in children.items()
        )
    )
    if attest is not None:
        resolved = list(await attest(resolved))
    body = render_index(resolved, annotations)
    media_type = index_media_type(resolved, annotations)
    digest = compute_digest(body)
    if push:
        # by digest first: the signature is made and pushed before the first tag moves, so
        # no reader ever sees the tag on an index without its signature
        await client.put_manifest(registry, repository, digest, body, media_type)
        if sign is not None:
            await sign(registry, repository, digest)
    for tag in tags if push else ():
        await client.put_manifest(registry, repository, tag, body, media_type)
    for tag in tags if push else ():
        _, descriptor = await client.get_manifest(registry, repository, tag)
        if descriptor.digest != digest:
            raise VerificationError(
                f"{registry}/{repository}:{tag} reads back as {descriptor.digest}, "
                f"but we pushed {digest}"
            )
    ordered = tuple(sorted(resolved, key=lambda c: str(c.platform)))
    return IndexResult(digest, media_type, len(body), ordered)

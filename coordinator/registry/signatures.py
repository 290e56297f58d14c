"""Signing a pushed index as cosign does: payload and config blobs, then the `.sig` manifest."""

from __future__ import annotations

import json
import logging

from cryptography.hazmat.primitives.asymmetric import ec

from polyarch.coordinator.core.model import BuildSpec, InvalidRequest
from polyarch.coordinator.registry.build_credentials import BuildCredentials
from polyarch.coordinator.registry.client import ManifestNotFound, RegistryClient
from polyarch.coordinator.registry.index import Sign
from polyarch.proto.cosign import (
    SIGNATURE_ANNOTATION,
    docker_reference,
    sign_payload,
    signature_layer,
    signature_layers,
    signature_manifest,
    signature_tag,
    simple_signing_payload,
)
from polyarch.proto.media_types import OCI_MANIFEST

log = logging.getLogger(__name__)

SIGN_OWN = "key"  # the build brought its own key (--sign-key)
SIGN_FARM = "farm"  # the coordinator's key (--sign-with farm)


def signing_key_of(
    spec: BuildSpec, own: BuildCredentials | None, farm: ec.EllipticCurvePrivateKey | None
) -> ec.EllipticCurvePrivateKey | None:
    """The key that signs this build, None when it asked for no signature. Raises
    InvalidRequest when the key it asked for is not (or no longer) here: the build's own
    key is in memory only, so after a coordinator restart it has to be submitted again."""
    if spec.sign == SIGN_FARM:
        if farm is None:
            raise InvalidRequest("--sign-with farm: this coordinator was started without a key")
        return farm
    if spec.sign == SIGN_OWN:
        if own is None or own.sign_key is None:
            raise InvalidRequest(
                "the build's signing key is gone (held in memory only: the coordinator "
                "restarted); submit it again with --sign-key"
            )
        return own.sign_key
    return None


async def push_signature(
    client: RegistryClient,
    registry: str,
    repository: str,
    digest: str,
    key: ec.EllipticCurvePrivateKey,
) -> str:
    """Signs `digest` for REGISTRY/REPOSITORY and pushes it under `sha256-<hex>.sig`, after
    the signatures already there (cosign appends); returns the `.sig` manifest's digest."""
    payload = simple_signing_payload(docker_reference(registry, repository), digest)
    layer = signature_layer(payload, sign_payload(key, payload))
    tag = signature_tag(digest)
    try:
        body, _ = await client.get_manifest(registry, repository, tag, accept=(OCI_MANIFEST,))
        layers = signature_layers(json.loads(body))
    except ManifestNotFound:
        layers = []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        layers = []  # not a signature manifest: ours replaces it
    signatures = {str(x["annotations"][SIGNATURE_ANNOTATION]) for x in layers}
    if layer["annotations"][SIGNATURE_ANNOTATION] not in signatures:
        layers.append(layer)
    manifest, config = signature_manifest(layers)
    await client.put_blob(registry, repository, payload)
    await client.put_blob(registry, repository, config)
    pushed = await client.put_manifest(registry, repository, tag, manifest, OCI_MANIFEST)
    log.info("signed %s/%s@%s (%s, %d signatures)", registry, repository, digest, tag, len(layers))
    return pushed


def signer(client: RegistryClient, key: ec.EllipticCurvePrivateKey | None) -> Sign | None:
    """The `sign` step of an index push with `key`, or None when nothing is signed."""
    if key is None:
        return None

    async def sign(registry: str, repository: str, digest: str) -> None:
        await push_signature(client, registry, repository, digest, key)

    return sign

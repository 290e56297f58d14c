"""Cosign's key-based signatures: simple-signing payload, EC P-256 keys, `.sig` manifests."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from polyarch.proto.media_types import OCI_MANIFEST
from polyarch.proto.references import DOCKER_HUB

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# Largest key file we read: a PEM EC key is ~250 bytes; anything near this is not one.
MAX_KEY_BYTES = 64 * 1024


class SigningKeyError(ValueError):
    """A key that cannot sign (or verify) as cosign does; the message never quotes the key."""


def signature_tag(digest: str) -> str:
    """The tag cosign stores a digest's signatures under: `sha256-<hex>.sig`."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}-{hex_part}.sig"


def docker_reference(registry: str, repository: str) -> str:
    """The repository as cosign names it in the payload (go-containerregistry's
    `Repository.Name()`: Docker Hub is `index.docker.io`)."""
    return f"{'index.docker.io' if registry == DOCKER_HUB else registry}/{repository}"


def simple_signing_payload(reference: str, digest: str) -> bytes:
    """The payload bytes cosign signs: its Go struct order (critical: identity, image, type;
    then optional), compact JSON, `optional` null when there are no annotations."""
    document = {
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": SIGNATURE_TYPE,
        },
        "optional": None,
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def load_signing_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM EC P-256 private key (PKCS#8 or SEC1); SigningKeyError otherwise."""
    if len(pem) > MAX_KEY_BYTES:
        raise SigningKeyError("the signing key file is too large to be a PEM EC key")
    if b"ENCRYPTED" in pem:
        raise SigningKeyError("the signing key is encrypted; give an unencrypted PEM key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # a password-protected key that did not say ENCRYPTED in its header
        raise SigningKeyError("the signing key is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError("not a PEM private key (PKCS#8 or SEC1 EC P-256 expected)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SigningKeyError("the signing key is not an EC key (EC P-256 expected)")
    if not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError(f"the signing key is on curve {key.curve.name}; P-256 expected")
    return key


def load_key_file(path: Path) -> ec.EllipticCurvePrivateKey:
    """A signing key from a file; ValueError naming the file (never its content) otherwise."""
    try:
        return load_signing_key(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"sign_key {path}: {exc.strerror}") from None
    except SigningKeyError as exc:
        raise ValueError(f"sign_key {path}: {exc}") from None


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """A PEM EC P-256 public key (what `cosign generate-key-pair` writes as cosign.pub)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError("not a PEM public key (EC P-256 expected)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError("the public key is not an EC P-256 key")
    return key


def sign_payload(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
    """Base64 of the DER ECDSA signature over SHA-256 of `payload` (the annotation value)."""
    return base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode("ascii")


def signature_valid(key: ec.EllipticCurvePublicKey, payload: bytes, signature_b64: str) -> bool:
    """Whether the base64 DER signature is the key's over `payload`."""
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), payload,
                   ec.ECDSA(hashes.SHA256()))  # fmt: skip
    except (InvalidSignature, ValueError):
        return False
    return True


def payload_sha256(data: bytes) -> str:
    """`sha256:<hex>` of a blob."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def signature_config(diff_ids: list[str]) -> bytes:
    """The config blob cosign writes: go-containerregistry's zero ConfigFile with the
    payloads as its layers (Go field order, zero time, empty strings kept)."""
    document = {
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"} for _ in diff_ids],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {},
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def signature_layer(payload: bytes, signature_b64: str) -> dict[str, Any]:
    """The descriptor of one simple-signing layer, its signature in the annotation."""
    return {
        "mediaType": SIMPLE_SIGNING,
        "size": len(payload),
        "digest": payload_sha256(payload),
        "annotations": {SIGNATURE_ANNOTATION: signature_b64},
    }


def signature_manifest(layers: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """(manifest, config) of the OCI manifest stored under `sha256-<hex>.sig`: one
    simple-signing layer per signature, as cosign appends them."""
    config = signature_config([str(layer["digest"]) for layer in layers])
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "size": len(config), "digest": payload_sha256(config)},
        "layers": layers,
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8"), config


def signature_layers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The simple-signing layers of a `.sig` manifest that carry a signature annotation."""
    found = []
    for layer in manifest.get("layers") or []:
        if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLE_SIGNING:
            continue
        signature = (layer.get("annotations") or {}).get(SIGNATURE_ANNOTATION)
        if isinstance(signature, str) and isinstance(layer.get("digest"), str):
            found.append(layer)
    return found


def payload_digest(payload: bytes) -> str:
    """`critical.image.docker-manifest-digest` of a payload, '' when it has none."""
    try:
        data = json.loads(payload)
        critical = data.get("critical") or {}
        if critical.get("type") != SIGNATURE_TYPE:
            return ""
        return str((critical.get("image") or {}).get("docker-manifest-digest") or "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return ""

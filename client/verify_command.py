"""`polyarch verify`: checks an image's cosign signature against a public key, at the registry."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyarch.client.build_secrets import SecretSpecError
from polyarch.client.cli_common import EXIT_FAILED, Session, UsageError, err
from polyarch.coordinator.registry.client import ManifestNotFound, RegistryClient, RegistryError
from polyarch.coordinator.registry.credentials import CredentialError, CredentialStore
from polyarch.proto.cosign import (
    SIGNATURE_ANNOTATION,
    SigningKeyError,
    load_public_key,
    payload_digest,
    signature_layers,
    signature_tag,
    signature_valid,
)
from polyarch.proto.media_types import OCI_MANIFEST
from polyarch.proto.references import ReferenceError, parse_reference

VERIFY_HELP = """\
Resolves IMAGE (a tag, or @sha256:...) at its registry with your docker credentials,
reads cosign's signature manifest for that digest (tag sha256-<hex>.sig) and checks
each signature over its payload with the public key, and that the payload names the
digest. Exit 0 when one signature passes both checks, 1 when none does (the reasons are
printed), 2 for usage errors."""


def add_verify_command(commands: Any, registries: argparse.ArgumentParser) -> None:
    """Adds `polyarch verify` (`registries` carries --insecure-registry)."""
    p = commands.add_parser(
        "verify", parents=[registries], help="verify an image's cosign signature",
        description="Verify IMAGE's key-based cosign signature with a public key.",
        epilog=VERIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--key", required=True, metavar="PUB",
                   help="PEM EC P-256 public key (cosign.pub)")  # fmt: skip
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(handler=cmd_verify)


@dataclass
class Verdict:
    """What verification found: the resolved digest, and why each signature failed."""

    reference: str
    digest: str = ""
    verified: int = 0
    failures: list[str] = field(default_factory=list)


def cmd_verify(args: argparse.Namespace, session: Session) -> int:
    try:
        key = load_public_key(Path(args.key).read_bytes())
    except OSError as exc:
        raise UsageError(f"--key {args.key}: {exc.strerror}") from None
    except SigningKeyError as exc:
        raise UsageError(f"--key {args.key}: {exc}") from None
    try:
        ref = parse_reference(args.image)
    except ReferenceError as exc:
        raise UsageError(f"IMAGE: {exc}") from None
    try:
        store = CredentialStore.from_docker_config()
    except CredentialError as exc:
        raise SecretSpecError(str(exc)) from None

    async def run() -> Verdict:
        async with RegistryClient(store, args.insecure_registry) as client:
            return await verify_image(client, ref.registry, ref.repository, ref.reference, key)

    try:
        verdict = asyncio.run(run())
    except RegistryError as exc:
        err(f"not verified: {exc}")
        return EXIT_FAILED
    if verdict.verified:
        total = verdict.verified + len(verdict.failures)
        print(f"verified: {verdict.reference}@{verdict.digest} ({verdict.verified} of {total})")
        return 0
    err(f"not verified: {verdict.reference}@{verdict.digest or '?'}")
    for failure in verdict.failures:
        err(f"  {failure}")
    return EXIT_FAILED


async def verify_image(
    client: RegistryClient, registry: str, repository: str, reference: str, key: Any
) -> Verdict:
    """Resolves `reference` to a digest and checks every signature stored for it."""
    verdict = Verdict(f"{registry}/{repository}")
    _, descriptor = await client.get_manifest(registry, repository, reference)
    verdict.digest = digest = descriptor.digest
    tag = signature_tag(digest)
    try:
        body, _ = await client.get_manifest(registry, repository, tag, accept=(OCI_MANIFEST,))
    except ManifestNotFound:
        verdict.failures.append(f"no signature: {verdict.reference}:{tag} does not exist")
        return verdict
    try:
        manifest: dict[str, Any] = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = {}
    layers = signature_layers(manifest) if isinstance(manifest, dict) else []
    if not layers:
        verdict.failures.append(f"{tag} holds no simple-signing layer with a signature")
    for layer in layers:
        payload = await client.get_blob(registry, repository, str(layer["digest"]))
        short = str(layer["digest"])[:19]
        if not signature_valid(key, payload, str(layer["annotations"][SIGNATURE_ANNOTATION])):
            verdict.failures.append(f"payload {short}: signature does not verify with the key")
        elif (named := payload_digest(payload)) != digest:
            verdict.failures.append(
                f"payload {short}: signed digest {named or '(none)'} is not the image's {digest}"
            )
        else:
            verdict.verified += 1
    return verdict

"""SLSA provenance v1 per platform, attached to the index the way BuildKit stores attestations."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from polyarch.coordinator.core.model import BuildSpec, InvalidRequest, JobRecord
from polyarch.coordinator.registry.client import RegistryClient, compute_digest
from polyarch.coordinator.registry.index import Attach, Attestation, ChildManifest
from polyarch.proto.attestations import parse_provenance
from polyarch.proto.media_types import OCI_MANIFEST

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
# What `buildDefinition` means on the farm: one platform of a polyarch build, its
# externalParameters as below, internalParameters.polyarch naming agent, mode and attempt.
BUILD_TYPE = "https://polyarch.dev/buildtypes/farm-platform/v1"
IN_TOTO = "application/vnd.in-toto+json"
PREDICATE_ANNOTATION = "in-toto.io/predicate-type"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# Build-arg names whose values never leave the coordinator in a statement.
SECRET_NAME = re.compile(r"token|secret|passw|key|credential|auth", re.IGNORECASE)
REDACTED = "[redacted]"


def parse_mode(value: str) -> str:
    """The spec's provenance mode from a request's value; InvalidRequest when malformed."""
    try:
        return parse_provenance(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def builder_id(name: str = "") -> str:
    """The coordinator as the SLSA builder: polyarch://coordinator/<advertised name or host>."""
    return f"polyarch://coordinator/{name or socket.gethostname()}"


def redacted(args: Mapping[str, str]) -> dict[str, str]:
    return {k: REDACTED if SECRET_NAME.search(k) else v for k, v in sorted(args.items())}


def rfc3339(seconds: float | None) -> str:
    if seconds is None:
        return ""
    moment = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
    return moment.replace("+00:00", "Z")


def statement(
    spec: BuildSpec, job: JobRecord, digest: str, mode: str, builder: str
) -> dict[str, Any]:
    """The in-toto statement for one platform's image `digest` (min: no args, no internal
    parameters, as BuildKit's min mode)."""
    external: dict[str, Any] = {
        "context": {"digest": spec.context_digest},
        "dockerfile": spec.dockerfile or "Dockerfile",
        "target": spec.target,
        "platform": job.platform,
    }
    definition: dict[str, Any] = {"buildType": BUILD_TYPE, "externalParameters": external}
    if mode == "max":
        external["args"] = redacted(spec.build_args)
        mode_name = job.mode.value if job.mode else ""
        definition["internalParameters"] = {
            "polyarch": {"agent": job.agent, "mode": mode_name, "attempt": job.attempt}
        }
    metadata = {"invocationId": job.build_id}
    for key, at in (("startedOn", job.started_at), ("finishedOn", job.finished_at)):
        if at is not None:
            metadata[key] = rfc3339(at)
    algorithm, _, hex_part = digest.partition(":")
    return {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": f"{spec.registry}/{spec.repository}", "digest": {algorithm: hex_part}}
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": definition,
            "runDetails": {"builder": {"id": builder}, "metadata": metadata},
        },
    }


def canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def attestation_documents(
    statement_body: bytes, extra_layers: Sequence[Mapping[str, Any]] = ()
) -> tuple[bytes, bytes]:
    """(config, manifest) of an attestation manifest: the statement as its first layer, then
    any layers an earlier attestation (BuildKit's, on the agent) already had. The config is
    a valid image config for unknown/unknown, as BuildKit's (registries and tools expect one)."""
    layer = {
        "mediaType": IN_TOTO,
        "digest": compute_digest(statement_body),
        "size": len(statement_body),
        "annotations": {PREDICATE_ANNOTATION: PREDICATE_TYPE},
    }
    layers = [layer, *(dict(extra) for extra in extra_layers)]
    config = canonical({
        "architecture": "unknown", "os": "unknown", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [str(lay["digest"]) for lay in layers]},
    })  # fmt: skip
    manifest = canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": compute_digest(config), "size": len(config)},
        "layers": layers,
    })  # fmt: skip
    return config, manifest


def provenance_attacher(
    client: RegistryClient, spec: BuildSpec, jobs: Sequence[JobRecord], builder: str
) -> Attach | None:
    """assemble_index's `attest` step for the spec's provenance mode (None when off): pushes
    each platform's statement and attestation manifest by digest to the build's repository."""
    mode = spec.provenance
    if not mode:
        return None
    by_platform = {str(job.platform): job for job in jobs}
    registry, repository = spec.registry, spec.repository

    async def attach_one(child: ChildManifest) -> ChildManifest:
        job = by_platform.get(str(child.platform))
        if job is None:
            return child
        extra: list[Mapping[str, Any]] = []
        if child.attestation is not None:  # keep BuildKit's layers beside ours
            body, _ = await client.get_manifest(registry, repository, child.attestation.digest)
            extra = list(json.loads(body).get("layers") or [])
        document = canonical(statement(spec, job, child.digest, mode, builder))
        config, manifest = attestation_documents(document, extra)
        await asyncio.gather(
            client.put_blob(registry, repository, document),
            client.put_blob(registry, repository, config),
        )
        digest = await client.put_manifest(
            registry, repository, compute_digest(manifest), manifest, OCI_MANIFEST
        )
        return replace(child, attestation=Attestation(digest, len(manifest)))

    async def attach(children: Sequence[ChildManifest]) -> Sequence[ChildManifest]:
        return await asyncio.gather(*(attach_one(child) for child in children))

    return attach

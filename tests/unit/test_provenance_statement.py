"""Unit tests: the provenance statement, its attestation manifest, the attested index, the flag."""

from __future__ import annotations

import hashlib
import json

import pytest

from polyarch.coordinator.core.model import BuildSpec, InvalidRequest, JobRecord, Mode
from polyarch.coordinator.registry.index import (
    Attestation,
    ChildManifest,
    index_media_type,
    is_attestation,
    render_index,
)
from polyarch.coordinator.registry.provenance import (
    BUILD_TYPE,
    attestation_documents,
    canonical,
    parse_mode,
    statement,
)
from polyarch.proto.attestations import parse_provenance
from polyarch.proto.media_types import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from polyarch.proto.platforms import parse_platform

IMAGE = "sha256:" + "a" * 64
SPEC = BuildSpec(
    context_digest="sha256:" + "c" * 64, dockerfile="docker/Dockerfile", platforms=["linux/arm64"],
    tags=["127.0.0.1:5000/team/app:v1"], target="runtime", registry="127.0.0.1:5000",
    repository="team/app",
    build_args={"VERSION": "1.2", "API_TOKEN": "s3cr3t", "db_password": "x", "SSH_KEY": "k",
                "AWS_CREDENTIALS": "c", "AUTHOR_NAME": "n", "PLAIN": "p"},
)  # fmt: skip
JOB = JobRecord(
    id="j1", build_id="b1", platform="linux/arm64", agent="pi-1", mode=Mode.EMULATED, attempt=2,
    started_at=1_700_000_000.5, finished_at=1_700_000_061.0,
)  # fmt: skip


def test_statement_max_has_every_field_and_redacts_secret_looking_args() -> None:
    doc = statement(SPEC, JOB, IMAGE, "max", "polyarch://coordinator/ci")
    assert doc["_type"] == "https://in-toto.io/Statement/v1"
    assert doc["predicateType"] == "https://slsa.dev/provenance/v1"
    assert doc["subject"] == [{"name": "127.0.0.1:5000/team/app", "digest": {"sha256": "a" * 64}}]
    definition = doc["predicate"]["buildDefinition"]
    assert definition["buildType"] == BUILD_TYPE
    external = definition["externalParameters"]
    assert external["context"] == {"digest": SPEC.context_digest}
    assert (external["dockerfile"], external["target"], external["platform"]) == (
        "docker/Dockerfile", "runtime", "linux/arm64",
    )  # fmt: skip
    # (?i)token|secret|passw|key|credential|auth: AUTHOR_NAME matches "auth" too, on purpose
    assert external["args"] == {
        "API_TOKEN": "[redacted]", "AUTHOR_NAME": "[redacted]", "AWS_CREDENTIALS": "[redacted]",
        "PLAIN": "p", "SSH_KEY": "[redacted]", "VERSION": "1.2", "db_password": "[redacted]",
    }  # fmt: skip
    assert definition["internalParameters"] == {
        "polyarch": {"agent": "pi-1", "mode": "emulated", "attempt": 2}
    }
    run = doc["predicate"]["runDetails"]
    assert run["builder"] == {"id": "polyarch://coordinator/ci"}
    assert run["metadata"] == {
        "invocationId": "b1", "startedOn": "2023-11-14T22:13:20Z",
        "finishedOn": "2023-11-14T22:14:21Z",
    }  # fmt: skip
    text = canonical(doc).decode()
    assert "s3cr3t" not in text and '"k"' not in text


def test_statement_min_leaves_out_args_and_internal_parameters() -> None:
    doc = statement(SPEC, JOB, IMAGE, "min", "polyarch://coordinator/ci")
    definition = doc["predicate"]["buildDefinition"]
    assert "internalParameters" not in definition
    assert "args" not in definition["externalParameters"]
    assert "s3cr3t" not in canonical(doc).decode() and "pi-1" not in canonical(doc).decode()
    assert doc["subject"][0]["digest"] == {"sha256": "a" * 64}


def test_attestation_manifest_is_buildkit_shaped_and_deterministic() -> None:
    body = canonical(statement(SPEC, JOB, IMAGE, "max", "b"))
    config, manifest = attestation_documents(body)
    assert (config, manifest) == attestation_documents(body)
    doc = json.loads(manifest)
    assert doc["mediaType"] == OCI_MANIFEST
    [layer] = doc["layers"]
    assert layer == {
        "mediaType": "application/vnd.in-toto+json",
        "digest": "sha256:" + hashlib.sha256(body).hexdigest(), "size": len(body),
        "annotations": {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v1"},
    }  # fmt: skip
    assert doc["config"]["digest"] == "sha256:" + hashlib.sha256(config).hexdigest()
    assert json.loads(config)["os"] == "unknown"
    kept = {"mediaType": "application/vnd.in-toto+json", "digest": "sha256:" + "e" * 64, "size": 3}
    _, merged = attestation_documents(body, [kept])
    assert json.loads(merged)["layers"][1] == kept


def _child(platform: str, digest: str, attested: bool = True) -> ChildManifest:
    attestation = Attestation("sha256:" + digest[-1] * 63 + "f", 400) if attested else None
    return ChildManifest(parse_platform(platform), digest, DOCKER_MANIFEST, 500,
                         attestation=attestation)  # fmt: skip


def test_attested_index_lists_images_then_attestations_sorted_and_stably() -> None:
    children = [_child("linux/arm/v7", "sha256:" + "3" * 64),
                _child("linux/amd64", "sha256:" + "1" * 64),
                _child("linux/arm64", "sha256:" + "2" * 64)]  # fmt: skip
    body = render_index(children)
    assert body == render_index(list(reversed(children)))
    doc = json.loads(body)
    assert doc["mediaType"] == OCI_INDEX == index_media_type(children)
    entries = doc["manifests"]
    images, attestations = entries[:3], entries[3:]
    assert [e["platform"]["architecture"] for e in images] == ["amd64", "arm", "arm64"]
    assert not any(is_attestation(e) for e in images)
    assert all(is_attestation(e) for e in attestations)
    for image, attestation in zip(images, attestations, strict=True):
        assert attestation["platform"] == {"architecture": "unknown", "os": "unknown"}
        assert attestation["annotations"] == {
            "vnd.docker.reference.type": "attestation-manifest",
            "vnd.docker.reference.digest": image["digest"],
        }
        assert attestation["mediaType"] == OCI_MANIFEST
    plain = [_child("linux/amd64", "sha256:" + "1" * 64, attested=False)]
    assert json.loads(render_index(plain))["mediaType"] != OCI_INDEX


@pytest.mark.parametrize(
    ("value", "mode"),
    [("false", ""), ("0", ""), ("", ""), ("true", "min"), ("1", "min"), ("mode=min", "min"),
     ("mode=max", "max"), ("MODE=MAX", "max"), ("mode=max,disabled=true", "")],
)  # fmt: skip
def test_provenance_values_as_buildx(value: str, mode: str) -> None:
    assert parse_provenance(value) == mode == parse_mode(value)


@pytest.mark.parametrize("value", ["mode=full", "maybe", "mode=max,builder-id=x"])
def test_provenance_values_refused(value: str) -> None:
    with pytest.raises(ValueError, match="expected false, true, mode=min or mode=max"):
        parse_provenance(value)
    with pytest.raises(InvalidRequest):
        parse_mode(value)

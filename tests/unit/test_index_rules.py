"""Unit tests: index media-type rules, canonical rendering, child verification (no network)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
import pytest

from polyarch.coordinator.registry.client import ManifestNotFound, RegistryClient
from polyarch.coordinator.registry.index import (
    Attestation,
    ChildManifest,
    DuplicatePlatform,
    PlatformMismatch,
    VerificationError,
    assemble_index,
    config_platform,
    index_media_type,
    is_attestation,
    render_index,
    resolve_child,
)
from polyarch.proto.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from polyarch.proto.platforms import parse_platform

REG = "127.0.0.1:5000"
REPO = "team/app"


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _child(platform: str, media_type: str = DOCKER_MANIFEST, fill: str = "a") -> ChildManifest:
    return ChildManifest(parse_platform(platform), "sha256:" + fill * 64, media_type, 500)


# -- media types and rendering -----------------------------------------------------------------


def test_all_docker_children_make_a_manifest_list() -> None:
    children = [_child("linux/amd64"), _child("linux/arm64", fill="b")]
    assert index_media_type(children) == DOCKER_MANIFEST_LIST


def test_any_oci_child_makes_an_oci_index() -> None:
    children = [_child("linux/amd64"), _child("linux/arm64", OCI_MANIFEST, "b")]
    assert index_media_type(children) == OCI_INDEX
    assert index_media_type([_child("linux/amd64", OCI_MANIFEST)]) == OCI_INDEX


def test_render_sorts_by_platform_and_handles_variants() -> None:
    children = [
        _child("linux/arm/v7", fill="c"),
        _child("linux/arm64/v8", fill="b"),
        _child("linux/amd64", fill="a"),
        _child("linux/arm/v6", fill="d"),
    ]
    body = render_index(children)
    document = json.loads(body)
    assert document["schemaVersion"] == 2
    assert document["mediaType"] == DOCKER_MANIFEST_LIST
    platforms = [m["platform"] for m in document["manifests"]]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm", "os": "linux", "variant": "v6"},
        {"architecture": "arm", "os": "linux", "variant": "v7"},
        {"architecture": "arm64", "os": "linux"},
    ]
    first = document["manifests"][0]
    assert first == {
        "mediaType": DOCKER_MANIFEST,
        "digest": "sha256:" + "a" * 64,
        "size": 500,
        "platform": {"architecture": "amd64", "os": "linux"},
    }


def test_render_is_canonical_and_order_independent() -> None:
    a = [_child("linux/amd64"), _child("linux/arm64", fill="b")]
    body = render_index(a)
    assert body == render_index(list(reversed(a)))
    assert b" " not in body and b"\n" not in body
    assert json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode() == body


def test_arm_without_variant_carries_v7() -> None:
    [entry] = json.loads(render_index([_child("linux/arm")]))["manifests"]
    assert entry["platform"]["variant"] == "v7"


def test_duplicate_platform_rejected() -> None:
    with pytest.raises(DuplicatePlatform, match="linux/arm64") as info:
        render_index([_child("linux/arm64"), _child("linux/arm64/v8", fill="b")])
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="at least one"):
        render_index([])


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"os": "linux", "architecture": "arm"}, "linux/arm/v7"),
        ({"os": "linux", "architecture": "arm", "variant": "v6"}, "linux/arm/v6"),
        ({"os": "linux", "architecture": "arm64", "variant": "v8"}, "linux/arm64"),
        ({"os": "linux", "architecture": "amd64"}, "linux/amd64"),
    ],
)
def test_config_platform_normalises(config: dict[str, str], expected: str) -> None:
    assert config_platform(config) == parse_platform(expected)


def test_attestation_detection() -> None:
    assert is_attestation({"annotations": {"vnd.docker.reference.type": "attestation-manifest"}})
    assert is_attestation({"platform": {"os": "unknown", "architecture": "unknown"}})
    assert not is_attestation({"platform": {"os": "linux", "architecture": "amd64"}})


# -- resolve/assemble against an in-memory registry ---------------------------------------------


class FakeRegistry:
    """Just enough of the distribution API: manifests by tag/digest and blobs, one repository."""

    def __init__(self) -> None:
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.lie_on_read: bytes | None = None

    def add_blob(self, data: dict[str, Any]) -> str:
        body = json.dumps(data).encode()
        self.blobs[_digest(body)] = body
        return _digest(body)

    def add_manifest(self, data: dict[str, Any], media_type: str) -> str:
        body = json.dumps(data).encode()
        self.manifests[_digest(body)] = (body, media_type)
        return _digest(body)

    def add_image(
        self, os: str, arch: str, variant: str = "", media_type: str = OCI_MANIFEST
    ) -> str:
        config: dict[str, str] = {"os": os, "architecture": arch}
        if variant:
            config["variant"] = variant
        config_digest = self.add_blob(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": "x", "digest": config_digest, "size": 1},
            "layers": [],
        }
        return self.add_manifest(manifest, media_type)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        kind, ref = request.url.path.split("/")[-2:]
        if kind == "blobs":
            if ref not in self.blobs:
                return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
            return httpx.Response(200, content=self.blobs[ref])
        if request.method == "PUT":
            self.puts.append(ref)
            body = request.content
            self.manifests[ref] = self.manifests[_digest(body)] = (
                body,
                request.headers["content-type"],
            )
            return httpx.Response(201, headers={"Docker-Content-Digest": _digest(body)})
        if ref not in self.manifests:
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        body, media_type = self.manifests[ref]
        if self.lie_on_read is not None and not ref.startswith("sha256:"):
            body = self.lie_on_read
        return httpx.Response(200, content=body, headers={"Content-Type": media_type})


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
async def client(fake: FakeRegistry) -> Any:
    async with RegistryClient(transport=httpx.MockTransport(fake)) as c:
        yield c


async def test_resolve_image_checks_config_platform(
    fake: FakeRegistry, client: RegistryClient
) -> None:
    digest = fake.add_image("linux", "arm")  # no variant: arm means v7
    child = await resolve_child(client, REG, REPO, digest, parse_platform("linux/arm/v7"))
    body = fake.manifests[digest][0]
    config_digest = json.loads(body)["config"]["digest"]
    assert child == ChildManifest(
        parse_platform("linux/arm/v7"), digest, OCI_MANIFEST, len(body), config_digest
    )
    with pytest.raises(PlatformMismatch, match=r"expected platform linux/arm/v6 .* linux/arm/v7"):
        await resolve_child(client, REG, REPO, digest, parse_platform("linux/arm/v6"))
    with pytest.raises(VerificationError):
        await resolve_child(client, REG, REPO, digest, parse_platform("linux/amd64"))


async def test_resolve_missing_digest_names_it(client: RegistryClient) -> None:
    missing = "sha256:" + "f" * 64
    with pytest.raises(ManifestNotFound, match=missing):
        await resolve_child(client, REG, REPO, missing, parse_platform("linux/amd64"))


async def test_child_index_with_attestation_is_flattened(
    fake: FakeRegistry, client: RegistryClient
) -> None:
    image = fake.add_image("linux", "arm64", "v8")
    attestation = fake.add_manifest({"schemaVersion": 2, "config": {}, "layers": []}, OCI_MANIFEST)
    size = len(fake.manifests[image][0])
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": image,
                "size": size,
                "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": attestation,
                "size": 10,
                "platform": {"architecture": "unknown", "os": "unknown"},
                "annotations": {
                    "vnd.docker.reference.type": "attestation-manifest",
                    "vnd.docker.reference.digest": image,
                },
            },
        ],
    }
    index_digest = fake.add_manifest(index, OCI_INDEX)
    child = await resolve_child(client, REG, REPO, index_digest, parse_platform("linux/arm64"))
    config_digest = json.loads(fake.manifests[image][0])["config"]["digest"]
    # BuildKit's attestation for the image is kept, not dropped (issue 9)
    assert child == ChildManifest(
        parse_platform("linux/arm64"), image, OCI_MANIFEST, size, config_digest,
        attestation=Attestation(attestation, 10),
    )  # fmt: skip
    rendered = json.loads(render_index([child]))
    assert rendered["mediaType"] == OCI_INDEX
    assert [m["digest"] for m in rendered["manifests"]] == [image, attestation]
    assert rendered["manifests"][1]["annotations"]["vnd.docker.reference.digest"] == image
    with pytest.raises(PlatformMismatch, match="no entry for platform linux/amd64"):
        await resolve_child(client, REG, REPO, index_digest, parse_platform("linux/amd64"))


async def test_assemble_pushes_every_tag_and_is_idempotent(
    fake: FakeRegistry, client: RegistryClient
) -> None:
    children = {
        parse_platform("linux/amd64"): fake.add_image("linux", "amd64", media_type=DOCKER_MANIFEST),
        parse_platform("linux/arm64"): fake.add_image("linux", "arm64", media_type=DOCKER_MANIFEST),
    }
    first = await assemble_index(client, REG, REPO, children, ["v1", "latest"])
    assert first.media_type == DOCKER_MANIFEST_LIST
    body = fake.manifests["v1"][0]
    assert first.digest == _digest(body) and first.size == len(body)
    assert fake.manifests["latest"][0] == body
    assert [str(c.platform) for c in first.children] == ["linux/amd64", "linux/arm64"]
    again = await assemble_index(client, REG, REPO, children, ["v1", "latest"])
    assert again == first
    # by digest first (a signature can be pushed before a tag moves), then each tag
    assert fake.puts == [first.digest, "v1", "latest"] * 2


async def test_assemble_signs_after_the_digest_push_and_before_any_tag(
    fake: FakeRegistry, client: RegistryClient
) -> None:
    children = {parse_platform("linux/amd64"): fake.add_image("linux", "amd64")}
    seen: list[tuple[str, str, str, list[str]]] = []

    async def sign(registry: str, repository: str, digest: str) -> None:
        seen.append((registry, repository, digest, list(fake.puts)))

    result = await assemble_index(client, REG, REPO, children, ["v1", "v2"], sign=sign)
    assert seen == [(REG, REPO, result.digest, [result.digest])]
    assert fake.puts == [result.digest, "v1", "v2"]
    seen.clear()
    await assemble_index(client, REG, REPO, children, [], push=False, sign=sign)
    assert not seen  # nothing published, nothing signed


async def test_assemble_detects_a_tag_that_reads_back_differently(
    fake: FakeRegistry, client: RegistryClient
) -> None:
    children = {parse_platform("linux/amd64"): fake.add_image("linux", "amd64")}
    fake.lie_on_read = b"{}"
    with pytest.raises(VerificationError, match="reads back as"):
        await assemble_index(client, REG, REPO, children, ["v1"])


async def test_assemble_rejects_bad_tags(fake: FakeRegistry, client: RegistryClient) -> None:
    children = {parse_platform("linux/amd64"): fake.add_image("linux", "amd64")}
    with pytest.raises(ValueError, match="invalid tag"):
        await assemble_index(client, REG, REPO, children, ["-bad"])
    with pytest.raises(ValueError, match="at least one tag"):
        await assemble_index(client, REG, REPO, children, [])

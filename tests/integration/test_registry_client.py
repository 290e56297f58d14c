"""Integration: registry client and index assembly against a real distribution registry."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import time
import uuid
from typing import Any

import httpx
import pytest

from polyarch.coordinator.registry.client import (
    ManifestNotFound,
    RegistryAuthError,
    RegistryClient,
    RegistryUnreachable,
)
from polyarch.coordinator.registry.credentials import CredentialStore
from polyarch.coordinator.registry.index import PlatformMismatch, assemble_index
from polyarch.proto.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from polyarch.proto.platforms import Platform, parse_platform
from tests.support.services import Registry, free_port

pytestmark = pytest.mark.integration

SKOPEO_INSPECT = ("skopeo", "inspect", "--raw", "--tls-verify=false", "--no-creds")


@pytest.fixture
def repo() -> str:
    return f"it/app-{uuid.uuid4().hex[:10]}"


# -- pushing test images with plain registry API calls ---------------------------------------


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _layer(text: str) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = text.encode()
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


async def _upload_blob(http: httpx.AsyncClient, base: str, repo: str, blob: bytes) -> str:
    digest = _digest(blob)
    start = await http.post(f"{base}/v2/{repo}/blobs/uploads/")
    assert start.status_code == 202, start.text
    location = httpx.URL(base).join(start.headers["location"])
    done = await http.put(
        location.copy_merge_params({"digest": digest}),
        content=blob,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert done.status_code == 201, done.text
    return digest


async def _push_manifest(
    http: httpx.AsyncClient, base: str, repo: str, manifest: dict[str, Any], media_type: str
) -> str:
    body = json.dumps(manifest).encode()
    digest = _digest(body)
    resp = await http.put(
        f"{base}/v2/{repo}/manifests/{digest}", content=body, headers={"Content-Type": media_type}
    )
    assert resp.status_code == 201, resp.text
    return digest


async def push_image(
    reg: Registry, repo: str, config: dict[str, str], media_type: str = DOCKER_MANIFEST
) -> str:
    """Pushes a one-layer image by digest, the way an agent does; returns the manifest digest."""
    docker = media_type == DOCKER_MANIFEST
    config_type = (
        "application/vnd.docker.container.image.v1+json"
        if docker
        else "application/vnd.oci.image.config.v1+json"
    )
    layer_type = (
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
        if docker
        else "application/vnd.oci.image.layer.v1.tar+gzip"
    )
    auth = (reg.username, reg.password) if reg.username and reg.password else None
    base = f"http://{reg.address}"
    async with httpx.AsyncClient(auth=auth) as http:
        config_body = json.dumps({**config, "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        layer = _layer(f"{config} {uuid.uuid4()}")
        config_digest = await _upload_blob(http, base, repo, config_body)
        layer_digest = await _upload_blob(http, base, repo, layer)
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config_body)},
            "layers": [{"mediaType": layer_type, "digest": layer_digest, "size": len(layer)}],
        }
        return await _push_manifest(http, base, repo, manifest, media_type)


def _config(platform: str) -> dict[str, str]:
    p = parse_platform(platform)
    config = {"os": p.os, "architecture": p.architecture}
    if p.variant:
        config["variant"] = p.variant
    return config


def skopeo_raw(reg: Registry, repo: str, tag: str) -> dict[str, Any]:
    """The manifest as an independent client (skopeo) reads it."""
    out = subprocess.run(
        [*SKOPEO_INSPECT, f"docker://{reg.address}/{repo}:{tag}"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    data: dict[str, Any] = json.loads(out)
    return data


def _entries(index: dict[str, Any]) -> set[tuple[str, str]]:
    result = set()
    for m in index["manifests"]:
        p = m["platform"]
        parts = [p["os"], p["architecture"]] + ([p["variant"]] if p.get("variant") else [])
        result.add(("/".join(parts), m["digest"]))
    return result


# -- tests ------------------------------------------------------------------------------------


async def test_manifest_list_for_three_platforms_under_two_tags(
    registry: Registry, repo: str
) -> None:
    platforms = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    children: dict[Platform, str] = {}
    for text in platforms:
        children[parse_platform(text)] = await push_image(registry, repo, _config(text))
    async with RegistryClient() as client:
        result = await assemble_index(client, registry.address, repo, children, ["1.0", "latest"])
        again = await assemble_index(client, registry.address, repo, children, ["1.0", "latest"])
        head = await client.head_manifest(registry.address, repo, "latest")
    assert again == result
    assert result.media_type == DOCKER_MANIFEST_LIST
    assert head.digest == result.digest and head.size == result.size
    expected = {
        (str(p) if p.architecture != "arm" else "linux/arm/v7", d) for p, d in children.items()
    }
    for tag in ("1.0", "latest"):
        seen = skopeo_raw(registry, repo, tag)
        assert seen["mediaType"] == DOCKER_MANIFEST_LIST
        assert _entries(seen) == expected
        assert all(m["mediaType"] == DOCKER_MANIFEST for m in seen["manifests"])


async def test_any_oci_child_gives_an_oci_index(registry: Registry, repo: str) -> None:
    children = {
        parse_platform("linux/amd64"): await push_image(registry, repo, _config("linux/amd64")),
        parse_platform("linux/arm64"): await push_image(
            registry, repo, _config("linux/arm64"), OCI_MANIFEST
        ),
    }
    async with RegistryClient() as client:
        result = await assemble_index(client, registry.address, repo, children, ["oci"])
    assert result.media_type == OCI_INDEX
    seen = skopeo_raw(registry, repo, "oci")
    assert seen["mediaType"] == OCI_INDEX
    assert _entries(seen) == {(str(p), d) for p, d in children.items()}


async def test_buildkit_style_child_index_is_flattened(registry: Registry, repo: str) -> None:
    image = await push_image(registry, repo, _config("linux/arm64"), OCI_MANIFEST)
    async with RegistryClient() as client:
        image_body, image_desc = await client.get_manifest(registry.address, repo, image)
    attestation = await push_image(
        registry, repo, {"os": "unknown", "architecture": "unknown"}, OCI_MANIFEST
    )
    child_index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": image,
                "size": len(image_body),
                "platform": {"architecture": "arm64", "os": "linux"},
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": attestation,
                "size": 100,
                "platform": {"architecture": "unknown", "os": "unknown"},
                "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
            },
        ],
    }
    async with httpx.AsyncClient() as http:
        index_digest = await _push_manifest(
            http, f"http://{registry.address}", repo, child_index, OCI_INDEX
        )
    children = {parse_platform("linux/arm64"): index_digest}
    async with RegistryClient() as client:
        result = await assemble_index(client, registry.address, repo, children, ["flat"])
    assert [c.digest for c in result.children] == [image_desc.digest]
    assert _entries(skopeo_raw(registry, repo, "flat")) == {("linux/arm64", image)}


async def test_platform_mismatch_is_rejected_and_nothing_is_tagged(
    registry: Registry, repo: str
) -> None:
    amd64 = await push_image(registry, repo, _config("linux/amd64"))
    wrong = await push_image(registry, repo, _config("linux/arm64"))
    children = {parse_platform("linux/amd64"): amd64, parse_platform("linux/arm/v7"): wrong}
    async with RegistryClient() as client:
        with pytest.raises(PlatformMismatch, match="expected platform linux/arm/v7") as info:
            await assemble_index(client, registry.address, repo, children, ["bad"])
        assert "linux/arm64" in str(info.value)
        with pytest.raises(ManifestNotFound):
            await client.head_manifest(registry.address, repo, "bad")


async def test_missing_child_digest_names_the_digest(registry: Registry, repo: str) -> None:
    present = await push_image(registry, repo, _config("linux/amd64"))
    missing = "sha256:" + hashlib.sha256(repo.encode()).hexdigest()
    children = {parse_platform("linux/amd64"): present, parse_platform("linux/arm64"): missing}
    errors: list[str] = []
    async with RegistryClient(on_request_error=errors.append) as client:
        with pytest.raises(ManifestNotFound, match=missing) as info:
            await assemble_index(client, registry.address, repo, children, ["x"])
    assert info.value.registry == registry.address and info.value.status == 404
    assert "not_found" in errors


async def test_unreachable_registry_fails_fast_after_bounded_retries() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    errors: list[str] = []
    started = time.monotonic()
    async with RegistryClient(retries=2, timeout=2.0, on_request_error=errors.append) as client:
        with pytest.raises(RegistryUnreachable, match="unreachable") as info:
            await client.head_manifest(address, "app", "latest")
    assert time.monotonic() - started < 5.0
    assert address in str(info.value)
    assert errors == ["unreachable"] * 3


async def test_wrong_password_is_an_auth_error_without_the_password(
    auth_registry: Registry, repo: str
) -> None:
    username, password = auth_registry.username, auth_registry.password
    assert username is not None and password is not None
    wrong = password + "-wrong"
    store = CredentialStore.in_memory({auth_registry.address: (username, wrong)})
    errors: list[str] = []
    async with RegistryClient(store, on_request_error=errors.append) as client:
        with pytest.raises(RegistryAuthError) as info:
            await client.head_manifest(auth_registry.address, repo, "latest")
    message = str(info.value)
    assert auth_registry.address in message and repo in message
    assert wrong not in message and password not in message and password not in repr(info.value)
    assert errors == ["auth"]
    async with RegistryClient() as anonymous:
        with pytest.raises(RegistryAuthError, match="anonymously"):
            await anonymous.head_manifest(auth_registry.address, repo, "latest")


async def test_basic_auth_with_correct_credentials_assembles(
    auth_registry: Registry, repo: str
) -> None:
    children = {
        parse_platform(p): await push_image(auth_registry, repo, _config(p))
        for p in ("linux/amd64", "linux/arm64")
    }
    assert auth_registry.username is not None and auth_registry.password is not None
    creds = (auth_registry.username, auth_registry.password)
    store = CredentialStore.in_memory({auth_registry.address: creds})
    async with RegistryClient(store) as client:
        result = await assemble_index(client, auth_registry.address, repo, children, ["v1"])
        body, desc = await client.get_manifest(auth_registry.address, repo, "v1")
    assert desc.digest == result.digest and desc.media_type == DOCKER_MANIFEST_LIST
    assert {m["digest"] for m in json.loads(body)["manifests"]} == set(children.values())

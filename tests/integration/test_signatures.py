"""Cosign signatures on real builders and a real registry, checked by verifiers not ours."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from polyarch.agent.builders.docker import DockerBuilder
from tests.support import ecdsa_p256
from tests.support.farm import Farm, running_farm
from tests.support.verify import attestation_entries, image_entries, skopeo_raw, skopeo_tags

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
THREE = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
ANNOTATION = "dev.cosignproject.cosign/signature"


def key_pair(where: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[Path, Path]:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    private, public = where / f"{name}.key", where / f"{name}.pub"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))  # fmt: skip
    return private, public


@pytest.fixture
async def signing_farm(tmp_path: Path, docker_binary: str) -> AsyncIterator[Farm]:
    """A farm whose coordinator holds a key of its own (`--sign-with farm`)."""
    farm_key, _ = key_pair(tmp_path, "farm")
    async with running_farm(tmp_path / "farm", sign_key=farm_key) as farm:
        await farm.add_agent(
            "sign-agent", DockerBuilder(docker_binary),
            native=["linux/amd64"], emulated=["linux/arm64", "linux/arm/v7"], slots=3,
        )  # fmt: skip
        yield farm


def fetch_signature(repo: str, digest: str, where: Path) -> tuple[bytes, bytes]:
    """(payload, DER signature) of the `.sig` tag, read with skopeo only."""
    tag = "sha256-" + digest.split(":")[1] + ".sig"
    manifest = skopeo_raw(f"{repo}:{tag}")
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    [layer] = manifest["layers"]
    assert layer["mediaType"] == SIMPLE_SIGNING
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", "--src-no-creds",
         f"docker://{repo}:{tag}", f"dir:{where}"],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    payload = (where / layer["digest"].split(":")[1]).read_bytes()
    return payload, base64.b64decode(layer["annotations"][ANNOTATION])


def openssl_verifies(public: Path, payload: bytes, der: bytes, where: Path) -> bool:
    (where / "payload").write_bytes(payload)
    (where / "sig.der").write_bytes(der)
    done = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(public), "-signature",
         str(where / "sig.der"), str(where / "payload")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return done.returncode == 0 and "Verified OK" in done.stdout


@pytest.mark.emulated
async def test_signed_three_platform_build_verifies_elsewhere_and_fails_once_the_tag_moves(
    signing_farm: Farm, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    farm = signing_farm
    private, public = key_pair(tmp_path, "user")
    _, stranger = key_pair(tmp_path, "stranger")
    repo = f"{registry.address}/{unique_repo}"
    copy = f"{registry.address}/{unique_repo}-copy"
    result = await farm.cli(
        "build", "--platform", ",".join(THREE), "-t", f"{repo}:v1", "-t", f"{copy}:v1",
        "--sign-key", str(private), "--build-arg", f"BASE={base_image}", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    digest = result.stdout.split()[-1]
    index = skopeo_raw(f"{repo}:v1")  # provenance (default mode=min) and signature together
    assert len(image_entries(index)) == 3 and len(attestation_entries(index)) == 3
    sig_tag = "sha256-" + digest.split(":")[1] + ".sig"
    assert sig_tag in skopeo_tags(repo)
    for n, target in enumerate((repo, copy)):  # each repository holds a signature naming it
        payload, der = fetch_signature(target, digest, tmp_path / f"sig{n}")
        critical = json.loads(payload)["critical"]
        assert critical["image"]["docker-manifest-digest"] == digest
        assert critical["identity"]["docker-reference"] == target
        assert critical["type"] == "cosign container image signature"
        # Independent verifiers. openssl's CLI parses the PEM and DER itself and runs its
        # EVP verify: another code path than the `cryptography` bindings we sign with, but
        # the same OpenSSL library underneath (said plainly). So the signature is also
        # checked by tests/support/ecdsa_p256.py: textbook P-256 arithmetic in pure Python,
        # sharing no code with OpenSSL (only unwrapping the PEM public key uses it).
        assert openssl_verifies(public, payload, der, tmp_path / f"sig{n}")
        assert not openssl_verifies(stranger, payload, der, tmp_path / f"sig{n}")
        b64 = base64.b64encode(der).decode()
        assert ecdsa_p256.verify(public.read_bytes(), payload, b64)
        checked = await farm.cli("verify", "--key", str(public), f"{target}:v1")
        assert checked.returncode == 0, checked.stderr
        assert digest in checked.stdout
    wrong = await farm.cli("verify", "--key", str(stranger), f"{repo}:v1")
    assert wrong.returncode == 1 and "does not verify with the key" in wrong.stderr

    # Another image moves the tag, with no provenance and no signature: verify now fails.
    moved = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{repo}:v1", "--provenance=false",
        "--build-arg", f"BASE={base_image}", "--label", "moved=yes", str(EXAMPLE),
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.split()[-1] != digest
    after = await farm.cli("verify", "--key", str(public), f"{repo}:v1")
    assert after.returncode == 1 and "no signature" in after.stderr, after.stderr
    pinned = await farm.cli("verify", "--key", str(public), f"{repo}@{digest}")
    assert pinned.returncode == 0, pinned.stderr  # the signed index itself still verifies


async def test_farm_key_signs_and_bad_keys_are_refused_before_upload(
    signing_farm: Farm, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    farm = signing_farm
    repo = f"{registry.address}/{unique_repo}"
    farm_public = tmp_path / "farm.pub"
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{repo}:farm", "--sign-with", "farm",
        "--build-arg", f"BASE={base_image}", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    checked = await farm.cli("verify", "--key", str(farm_public), f"{repo}:farm")
    assert checked.returncode == 0, checked.stderr

    p384, _ = key_pair(tmp_path, "p384", ec.SECP384R1())
    refused = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{repo}:bad", "--sign-key", str(p384),
        str(EXAMPLE),
    )  # fmt: skip
    assert refused.returncode == 2 and "P-256" in refused.stderr
    assert "context" not in refused.stderr  # refused before any upload
    key_body = p384.read_text().splitlines()[1]
    assert key_body not in refused.stderr and key_body not in refused.stdout
    usage = await farm.cli("verify", "--key", str(tmp_path / "missing.pub"), f"{repo}:farm")
    assert usage.returncode == 2


async def test_sign_with_farm_is_refused_when_the_coordinator_has_no_key(
    farm: Farm, docker_binary: str, registry, unique_repo: str
) -> None:
    await farm.add_agent("plain-agent", DockerBuilder(docker_binary), native=["linux/amd64"])
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{registry.address}/{unique_repo}:x",
        "--sign-with", "farm", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 2 and "no signing key" in result.stderr, result.stderr

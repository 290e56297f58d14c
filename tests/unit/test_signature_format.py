"""Cosign signatures without a registry: payload bytes, key refusals, sign and verify."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from polyarch.coordinator.config import ConfigError, add_coordinator_flags, config_from
from polyarch.coordinator.core.model import BuildSpec, InvalidRequest, spec_json
from polyarch.coordinator.registry.build_credentials import check_build_credentials
from polyarch.coordinator.registry.gate import GatePolicy, SupplyChainGate
from polyarch.coordinator.wire.convert import sign_mode
from polyarch.proto.cosign import (
    SIGNATURE_ANNOTATION,
    SIMPLE_SIGNING,
    SigningKeyError,
    docker_reference,
    load_public_key,
    load_signing_key,
    payload_digest,
    payload_sha256,
    sign_payload,
    signature_layer,
    signature_layers,
    signature_manifest,
    signature_tag,
    signature_valid,
    simple_signing_payload,
)
from tests.support import ecdsa_p256

DIGEST = "sha256:" + "ab" * 32


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, fmt: str = "pkcs8") -> bytes:
    form = serialization.PrivateFormat.PKCS8
    if fmt == "sec1":
        form = serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_payload_is_cosigns_simple_signing_byte_for_byte() -> None:
    # cosign marshals Go structs: field order, no spaces, optional null without annotations
    expected = (
        '{"critical":{"identity":{"docker-reference":"127.0.0.1:5000/team/app"},'
        f'"image":{{"docker-manifest-digest":"{DIGEST}"}},'
        '"type":"cosign container image signature"},"optional":null}'
    ).encode()
    assert simple_signing_payload("127.0.0.1:5000/team/app", DIGEST) == expected
    assert payload_digest(expected) == DIGEST
    assert payload_digest(b'{"critical":{"type":"other"}}') == ""
    assert payload_digest(b"not json") == ""


def test_signature_tag_and_references() -> None:
    assert signature_tag(DIGEST) == "sha256-" + "ab" * 32 + ".sig"
    assert docker_reference("127.0.0.1:5000", "team/app") == "127.0.0.1:5000/team/app"
    assert docker_reference("docker.io", "library/app") == "index.docker.io/library/app"


@pytest.mark.parametrize("fmt", ["pkcs8", "sec1"])
def test_pkcs8_and_sec1_p256_keys_load(fmt: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    loaded = load_signing_key(pem(key, fmt))
    assert loaded.private_numbers() == key.private_numbers()


def test_refusals_say_why_and_never_quote_the_key() -> None:
    p384 = pem(ec.generate_private_key(ec.SECP384R1()))
    rsa_key = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    encrypted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )  # fmt: skip
    sec1_encrypted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"pw"),
    )  # fmt: skip
    public = public_pem(ec.generate_private_key(ec.SECP256R1()))
    cases = {
        p384: "secp384r1",
        rsa_key: "not an EC key",
        encrypted: "encrypted",
        sec1_encrypted: "encrypted",
        public: "not a PEM private key",
        b"hello": "not a PEM private key",
        b"x" * 70_000: "too large",
    }
    for data, reason in cases.items():
        with pytest.raises(SigningKeyError, match=reason) as caught:
            load_signing_key(data)
        assert b"PRIVATE" not in str(caught.value).encode()
        with pytest.raises(InvalidRequest, match="--sign-key") as refused:
            check_build_credentials([], [], data)
        if len(data) > 80:  # a line of the key's body never shows in the refusal
            assert data[40:70].decode(errors="replace") not in str(refused.value)


def test_signature_round_trip_and_an_independent_verifier() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    payload = simple_signing_payload("127.0.0.1:5000/team/app", DIGEST)
    signature = sign_payload(key, payload)
    public = load_public_key(public_pem(key))
    assert signature_valid(public, payload, signature)
    assert not signature_valid(public, payload.replace(b"ab", b"cd", 1), signature)
    other = load_public_key(public_pem(ec.generate_private_key(ec.SECP256R1())))
    assert not signature_valid(other, payload, signature)
    assert not signature_valid(public, payload, "not base64!")
    # textbook arithmetic in pure Python (tests/support/ecdsa_p256.py), no OpenSSL involved
    assert ecdsa_p256.verify(public_pem(key), payload, signature)
    assert not ecdsa_p256.verify(public_pem(key), payload + b" ", signature)


def test_signature_manifest_is_laid_out_as_cosign_writes_it() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    payload = simple_signing_payload("r/app", DIGEST)
    layer = signature_layer(payload, sign_payload(key, payload))
    body, config = signature_manifest([layer])
    manifest = json.loads(body)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"] == {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "size": len(config),
        "digest": payload_sha256(config),
    }
    assert json.loads(config)["rootfs"] == {"type": "layers", "diff_ids": [payload_sha256(payload)]}
    (only,) = manifest["layers"]
    assert only["mediaType"] == SIMPLE_SIGNING
    assert only["digest"] == payload_sha256(payload) and only["size"] == len(payload)
    assert base64.b64decode(only["annotations"][SIGNATURE_ANNOTATION])[0] == 0x30  # DER
    assert signature_layers(manifest) == [layer]


def test_build_credentials_hold_the_key_without_showing_it() -> None:
    key_pem = pem(ec.generate_private_key(ec.SECP256R1()))
    held = check_build_credentials([], [], key_pem)
    assert held.sign_key is not None and not held.empty
    assert repr(held).endswith("sign_key=True)")
    assert check_build_credentials([], []).empty


def test_sign_mode_and_the_farm_key_policy(tmp_path: Path) -> None:
    assert sign_mode(b"", "") == "" and sign_mode(b"k", "") == "key"
    assert sign_mode(b"", "farm") == "farm"
    with pytest.raises(InvalidRequest, match="choose one"):
        sign_mode(b"k", "farm")
    with pytest.raises(InvalidRequest, match="only 'farm'"):
        sign_mode(b"", "elsewhere")
    spec = BuildSpec("sha256:" + "0" * 64, "Dockerfile", ["linux/amd64"], ["r/app:v1"])
    assert '"sign"' not in spec_json(spec)  # request hashes of older builds stay the same
    spec.sign = "farm"
    with pytest.raises(InvalidRequest, match="no signing key"):
        SupplyChainGate().check_submit_policy(spec)
    key_file = tmp_path / "farm.pem"
    key_file.write_bytes(pem(ec.generate_private_key(ec.SECP256R1()), "sec1"))
    SupplyChainGate(GatePolicy(sign_key=key_file)).check_submit_policy(spec)
    spec.no_publish = True
    with pytest.raises(InvalidRequest, match="needs a pushed index"):
        SupplyChainGate(GatePolicy(sign_key=key_file)).check_submit_policy(spec)


def test_coordinator_refuses_a_bad_key_file_at_start(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_coordinator_flags(parser)
    bad = tmp_path / "bad.pem"
    bad.write_bytes(pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(ConfigError, match="P-256"):
        config_from(parser.parse_args(["--sign-key", str(bad)]))
    with pytest.raises(ConfigError, match="No such file"):
        config_from(parser.parse_args(["--sign-key", str(tmp_path / "none.pem")]))
    good = tmp_path / "good.pem"
    good.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    assert config_from(parser.parse_args(["--sign-key", str(good)])).sign_key == good

"""The one plain-HTTP rule (loopback as Docker does, or named insecure) and the version."""

from __future__ import annotations

import pytest

from polyarch.agent.runtime import registry_is_insecure
from polyarch.coordinator.registry.client import registry_scheme
from polyarch.proto.registries import (
    is_loopback_address,
    is_loopback_registry,
    polyarch_version,
    registry_host,
)


@pytest.mark.parametrize(
    ("registry", "loopback"),
    [
        ("localhost", True), ("localhost:5000", True), ("127.0.0.1:5000", True),
        ("127.5.6.7", True), ("[::1]:5000", True), ("::1", True),
        ("10.0.0.5:5000", False), ("ghcr.io", False), ("registry.example:443", False),
        ("localhost.example.com", False), ("127.0.0.1.nip.io", False),
    ],
)  # fmt: skip
def test_loopback_registries(registry: str, loopback: bool) -> None:
    assert is_loopback_registry(registry) is loopback
    # every caller applies the same rule
    assert (registry_scheme(registry) == "http") is loopback
    assert registry_is_insecure(f"{registry}/team/app", []) is loopback


def test_listen_addresses_use_the_same_loopback_rule() -> None:
    assert is_loopback_address("127.0.0.1:7600") and is_loopback_address("[::1]:7600")
    assert is_loopback_address("localhost:0")
    assert not is_loopback_address("0.0.0.0:7600") and not is_loopback_address("farm.example:7600")


def test_registries_named_insecure_by_host_or_host_port() -> None:
    assert registry_scheme("reg.internal:5000", ["reg.internal:5000"]) == "http"
    assert registry_scheme("reg.internal:5000", ["reg.internal"]) == "http"
    assert registry_scheme("reg.internal:5000", ["other"]) == "https"
    assert registry_host("[fd00::1]:5000") == "fd00::1"


def test_the_version_comes_from_package_metadata() -> None:
    from importlib import metadata

    assert polyarch_version() == metadata.version("polyarch")

"""Platform parsing and normalisation follow the OCI/containerd conventions."""

import pytest

from polyarch.proto.platforms import (
    Platform,
    PlatformError,
    parse_platform,
    parse_platforms,
    platform_from_uname,
)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("linux/amd64", "linux/amd64"),
        ("LINUX/AMD64", "linux/amd64"),
        (" linux/amd64 ", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/amd64/v1", "linux/amd64"),
        ("linux/amd64/v3", "linux/amd64/v3"),
        ("linux/arm64", "linux/arm64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/arm/v7", "linux/arm/v7"),
        ("linux/armhf", "linux/arm/v7"),
        ("linux/armel", "linux/arm/v6"),
        ("linux/arm/v6", "linux/arm/v6"),
        ("linux/ppc64le", "linux/ppc64le"),
        ("linux/s390x", "linux/s390x"),
        ("linux/riscv64", "linux/riscv64"),
        ("linux/386", "linux/386"),
        ("linux/i386", "linux/386"),
    ],
)
def test_normalises_to_the_canonical_spelling(text: str, canonical: str) -> None:
    assert str(parse_platform(text)) == canonical


def test_equal_spellings_are_equal_platforms() -> None:
    assert parse_platform("linux/arm64/v8") == parse_platform("linux/arm64")
    assert parse_platform("linux/arm") == parse_platform("linux/arm/v7")
    assert parse_platform("linux/arm/v6") != parse_platform("linux/arm/v7")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty platform"),
        ("linux", "malformed platform 'linux'"),
        ("linux/", "malformed platform"),
        ("linux/arm64/v8/extra", "malformed platform"),
        ("linux//v7", "malformed platform"),
        ("linux/amd 64", "invalid characters"),
        ("plan9/amd64", "unknown operating system 'plan9'"),
        ("linux/sparc", "unknown architecture 'sparc'"),
        ("linux/arm/v9", "unknown variant 'v9' for arm"),
        ("linux/386/v2", "unknown variant 'v2' for 386"),
    ],
)
def test_rejects_malformed_and_unknown_platforms_naming_the_problem(
    text: str, fragment: str
) -> None:
    with pytest.raises(PlatformError, match=fragment):
        parse_platform(text)


def test_parse_platforms_splits_commas_and_drops_duplicates_in_order() -> None:
    parsed = parse_platforms("linux/arm64,linux/amd64,linux/aarch64, linux/arm")
    assert [str(p) for p in parsed] == ["linux/arm64", "linux/amd64", "linux/arm/v7"]
    assert parse_platforms(["linux/amd64,linux/arm64", "linux/arm64/v8"]) == [
        Platform("linux", "amd64"),
        Platform("linux", "arm64"),
    ]
    with pytest.raises(PlatformError, match="no platform"):
        parse_platforms(" , ")


def test_index_variants_and_slugs() -> None:
    assert parse_platform("linux/arm").oci_variant == "v7"
    assert parse_platform("linux/arm64").oci_variant == "v8"
    assert parse_platform("linux/amd64").oci_variant == ""
    assert parse_platform("linux/arm/v7").slug == "linux-arm-v7"


@pytest.mark.parametrize(
    ("machine", "platform"),
    [("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"), ("armv7l", "linux/arm/v7")],
)
def test_uname_machine_maps_to_platform(machine: str, platform: str) -> None:
    assert str(platform_from_uname(machine)) == platform


def test_unknown_uname_machine_is_rejected() -> None:
    with pytest.raises(PlatformError, match="unsupported machine type 'vax'"):
        platform_from_uname("vax")

"""Wheelhouse targets: user spellings in, pip's target flags out (no pip run here)."""

from __future__ import annotations

import pytest

from polyarch.ops.wheelhouse import WheelhouseError, WheelTarget


@pytest.mark.parametrize(
    ("arch", "machine"),
    [("amd64", "x86_64"), ("x86_64", "x86_64"), ("arm64", "aarch64"), ("AArch64", "aarch64")],
)
def test_docker_and_kernel_arch_names_mean_the_same_machine(arch: str, machine: str) -> None:
    assert WheelTarget.parse("3.11", arch).machine == machine


@pytest.mark.parametrize(
    ("python", "arch", "glibc", "message"),
    [
        ("3", "amd64", "2.17", "python version must look like 3.11"),
        ("3.11", "arm/v7", "2.17", "unsupported arch 'arm/v7'"),
        ("3.11", "amd64", "2.12", "glibc must be 2.17 or newer"),
    ],
)
def test_a_target_pip_cannot_resolve_for_is_refused_by_name(
    python: str, arch: str, glibc: str, message: str
) -> None:
    with pytest.raises(WheelhouseError, match=message):
        WheelTarget.parse(python, arch, glibc)


def test_pip_flags_accept_every_manylinux_tag_up_to_the_targets_glibc() -> None:
    target = WheelTarget.parse("3.12", "arm64", "2.28")
    flags = target.pip_flags()
    platforms = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--platform"]
    assert platforms[0] == "manylinux_2_28_aarch64"
    assert platforms[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert len(platforms) == 28 - 17 + 2
    assert flags[:3] == ["--only-binary=:all:", "--implementation", "cp"]
    assert flags[3:7] == ["--python-version", "3.12", "--abi", "cp312"]
    assert target.name == "cp312-aarch64-glibc2.28"

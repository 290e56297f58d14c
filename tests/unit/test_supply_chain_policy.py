"""The supply-chain gate without a registry: glob rules, {ref} expansion, policy refusals."""

from __future__ import annotations

import argparse
import sys

import pytest

from polyarch.coordinator.config import add_coordinator_flags, config_from
from polyarch.coordinator.core.model import BuildSpec, InvalidRequest, request_hash
from polyarch.coordinator.registry.gate import GatePolicy, SupplyChainGate
from polyarch.coordinator.registry.immutable import ImmutableTags
from polyarch.coordinator.registry.scan import ScanCommandError, run_scanner, scan_argv

REF = "127.0.0.1:5000/team/app@sha256:" + "a" * 64


def spec(**fields: object) -> BuildSpec:
    return BuildSpec("sha256:" + "0" * 64, "Dockerfile", ["linux/amd64"], ["r/app:v1"], **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "repository", "tag", "protected"),
    [
        ("v*", "team/app", "v1.2", True),
        ("v*", "team/app", "latest", False),
        ("v*", "team/app", "dev-v1", False),  # the whole tag, not a substring
        ("V*", "team/app", "v1", False),  # tags are case-sensitive
        ("release-?", "team/app", "release-3", True),
        ("team/*:v*", "team/app", "v1", True),  # REPO:TAG glob
        ("team/*:v*", "other/app", "v1", False),
        ("*:latest", "team/app", "latest", True),
    ],
)
def test_globs_match_the_tag_or_repo_and_tag(
    pattern: str, repository: str, tag: str, protected: bool
) -> None:
    assert bool(ImmutableTags([pattern]).rule_for(repository, tag)) is protected


def test_protected_tags_are_read_from_normalised_references() -> None:
    rules = ImmutableTags(["v*", " ", "x/y:stable"])
    assert rules.patterns == ("v*", "x/y:stable")
    found = rules.protected(["127.0.0.1:5000/x/y:v2", "127.0.0.1:5000/x/y:stable", "x/y:dev"])
    assert found == [
        ("127.0.0.1:5000", "x/y", "v2", "v*"),
        ("127.0.0.1:5000", "x/y", "stable", "x/y:stable"),
    ]
    assert not ImmutableTags([])


def test_ref_is_one_word_wherever_it_stands() -> None:
    argv = scan_argv("trivy image --exit-code 1 --severity 'CRITICAL,HIGH' {ref}", REF)
    assert argv == ["trivy", "image", "--exit-code", "1", "--severity", "CRITICAL,HIGH", REF]
    assert scan_argv("scan --image={ref} 'a b'", REF) == ["scan", f"--image={REF}", "a b"]
    # no shell: a reference never becomes two words or a command
    assert scan_argv("echo {ref}", "x; rm -rf /") == ["echo", "x; rm -rf /"]


@pytest.mark.parametrize("template", ["", "trivy image", "scan 'unbalanced {ref}"])
def test_unusable_templates_are_refused(template: str) -> None:
    with pytest.raises(ScanCommandError):
        scan_argv(template, REF)


async def test_the_scanner_keeps_its_status_and_last_lines() -> None:
    script = "import sys; [print(i) for i in range(50)]; print(sys.argv[1]); sys.exit(3)"
    result = await run_scanner(f"{sys.executable} -c '{script}' {{ref}}", "linux/amd64", REF, 30)
    assert (result.status, result.outcome, len(result.tail)) == (3, "failed", 20)
    assert result.tail[-1] == REF
    assert result.summary().startswith(f"linux/amd64: scanner exited 3 on {REF}: ")
    slow = await run_scanner(f"{sys.executable} -c 'import time; time.sleep(30)' {{ref}}",
                             "linux/arm64", REF, 0.5)  # fmt: skip
    assert (slow.status, slow.outcome) == (None, "timeout")
    missing = await run_scanner("/nonexistent/scanner {ref}", "linux/arm64", REF, 5)
    assert missing.status == 127 and not missing.passed


def test_a_build_scan_command_needs_the_policy() -> None:
    with pytest.raises(InvalidRequest, match="--allow-build-scan-command"):
        SupplyChainGate().check_submit_policy(spec(scan_command="trivy image {ref}"))
    allowing = SupplyChainGate(GatePolicy(allow_build_scan_command=True))
    allowing.check_submit_policy(spec(scan_command="trivy image {ref}"))
    with pytest.raises(InvalidRequest, match="no \\{ref\\}"):
        allowing.check_submit_policy(spec(scan_command="trivy image"))
    farm_scans = SupplyChainGate(GatePolicy("check {ref}", allow_build_scan_command=True))
    with pytest.raises(InvalidRequest, match="already scans"):
        farm_scans.check_submit_policy(spec(scan_command="mine {ref}"))
    assert farm_scans.scan_command_of(spec()) == "check {ref}"
    with pytest.raises(ScanCommandError):
        SupplyChainGate(GatePolicy("no placeholder"))


def test_the_new_spec_field_keeps_old_request_hashes() -> None:
    assert request_hash(spec()) == request_hash(spec(scan_command=""))
    assert request_hash(spec()) != request_hash(spec(scan_command="x {ref}"))


def test_flags_fill_the_policy() -> None:
    parser = argparse.ArgumentParser()
    add_coordinator_flags(parser)
    args = parser.parse_args(
        ["--immutable-tags", "v*,release-*", "--immutable-tags", "x:y", "--scan-timeout", "5",
         "--scan-command", "trivy image {ref}", "--allow-build-scan-command"]
    )  # fmt: skip
    config = config_from(args)
    assert config.immutable_tags == ["v*", "release-*", "x:y"]
    assert (config.scan_timeout, config.scan_command) == (5.0, "trivy image {ref}")
    assert config.allow_build_scan_command
    assert not config_from(parser.parse_args([])).allow_build_scan_command

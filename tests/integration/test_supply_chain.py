"""The supply-chain gate on a real registry and a real builder: a scan that keeps a tag where
it was, and immutable tags refused at submit and right before the index PUT."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polyarch.agent.builders.docker import DockerBuilder
from polyarch.coordinator.core.model import BuildState
from tests.support.farm import Farm, running_farm
from tests.support.poll import poll_until
from tests.support.services import SKOPEO_BINARY

# No RUN step but the optional sleep: the label decides what the scanner says. The build
# args pin the image's timestamps, so the same request gives the same digest again.
DOCKERFILE = """\
ARG BASE
FROM ${BASE}
ARG VERDICT=pass
ARG PAUSE=0
LABEL scan=${VERDICT}
RUN sleep ${PAUSE}
"""

# A real scanner: skopeo reads the pushed image's config; label scan=fail is a finding.
SCANNER = f"""\
#!/bin/sh
labels=$({SKOPEO_BINARY} inspect --tls-verify=false --no-creds --format '{{{{.Labels}}}}' \\
  "docker://$1") || exit 2
echo "scanned $1: $labels"
case "$labels" in
  *scan:fail*) echo "CRITICAL: the image is labelled scan=fail"; exit 1 ;;
esac
echo "no finding"
"""


def raw_digest(reference: str) -> str:
    """The digest of what the registry holds at reference, as skopeo reads it."""
    done = subprocess.run(
        [SKOPEO_BINARY, "inspect", "--raw", "--tls-verify=false", "--no-creds",
         f"docker://{reference}"], capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    return "sha256:" + hashlib.sha256(done.stdout).hexdigest()


def build_id_of(stderr: str) -> str:
    found = re.search(r"submitted build (\w+)", stderr)
    assert found, stderr
    return found[1]


@pytest.fixture
def context(tmp_path: Path) -> Path:
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text(DOCKERFILE)
    return tmp_path / "ctx"


@pytest.fixture
def scanner(tmp_path: Path) -> Path:
    path = tmp_path / "scanner.sh"
    path.write_text(SCANNER)
    path.chmod(0o755)
    return path


@pytest.fixture
async def gated_farm(
    request: pytest.FixtureRequest, tmp_path: Path, docker_binary: str, scanner: Path
) -> AsyncIterator[Farm]:
    """A farm with the policy the test names (`scan` or `immutable`), and a docker agent."""
    settings: dict[str, object] = (
        {"scan_command": f"{scanner} {{ref}}"}
        if request.param == "scan"
        else {"immutable_tags": ["v*"]}
    )
    async with running_farm(tmp_path / "farm", **settings) as farm:
        await farm.add_agent("docker-agent", DockerBuilder(docker_binary),
                             native=["linux/amd64"], slots=2)  # fmt: skip
        yield farm


def build_args(repo: str, tag: str, base: str, verdict: str, pause: int = 0) -> list[str]:
    return [
        "build", "--platform", "linux/amd64", "-t", f"{repo}:{tag}",
        "--build-arg", f"BASE={base}", "--build-arg", f"VERDICT={verdict}",
        "--build-arg", f"PAUSE={pause}", "--build-arg", "SOURCE_DATE_EPOCH=0",
    ]  # fmt: skip


@pytest.mark.parametrize("gated_farm", ["scan"], indirect=True)
async def test_a_failing_scan_leaves_the_tag_where_it_was(
    gated_farm: Farm, registry, base_image: str, unique_repo: str, context: Path
) -> None:  # fmt: skip
    farm = gated_farm
    repo = f"{registry.address}/{unique_repo}"
    clean = await farm.cli(*build_args(repo, "latest", base_image, "pass"), str(context))
    assert clean.returncode == 0, clean.stderr
    first = raw_digest(f"{repo}:latest")
    assert clean.stdout.strip().splitlines()[-1] == first

    bad = await farm.cli(*build_args(repo, "latest", base_image, "fail"), str(context))
    assert bad.returncode != 0
    assert "scan gate: linux/amd64: scanner exited 1" in bad.stderr, bad.stderr
    assert "CRITICAL: the image is labelled scan=fail" in bad.stderr
    assert raw_digest(f"{repo}:latest") == first, "the tag moved after a failed scan"
    manager = farm.coordinator.manager
    assert manager is not None
    build, jobs = await manager.get(build_id_of(bad.stderr))
    assert build.state is BuildState.FAILED and not build.index_digest
    (job,) = jobs
    assert job.failed_step == "scan" and "scan=fail" in job.error  # kept with the build
    assert job.error.splitlines()[1].startswith("scanned ")  # its last lines, in full

    again = await farm.cli(*build_args(repo, "latest", base_image, "pass-2"), str(context))
    assert again.returncode == 0, again.stderr
    assert raw_digest(f"{repo}:latest") not in (first, "")
    metrics = farm.coordinator.metrics.registry
    assert metrics.get_sample_value("polyarch_image_scans_total", {"outcome": "passed"}) == 2
    assert metrics.get_sample_value("polyarch_image_scans_total", {"outcome": "failed"}) == 1


@pytest.mark.parametrize("gated_farm", ["immutable"], indirect=True)
async def test_an_immutable_tag_is_refused_unless_it_would_not_move(
    gated_farm: Farm, registry, base_image: str, unique_repo: str, context: Path
) -> None:  # fmt: skip
    farm = gated_farm
    repo = f"{registry.address}/{unique_repo}"
    first = await farm.cli(*build_args(repo, "v1", base_image, "a"), "--provenance=false",
                           str(context))  # fmt: skip
    assert first.returncode == 0, first.stderr
    v1 = raw_digest(f"{repo}:v1")

    other = await farm.cli(*build_args(repo, "v1", base_image, "b"), str(context))
    assert other.returncode != 0
    assert f"tag {repo}:v1 is immutable (rule 'v*') and already points at {v1}" in other.stderr
    assert "submitted build" not in other.stderr  # refused at submit

    # Provenance records each build's times, so an attested rebuild is always a new index:
    # an immutable tag then takes one push. Without it an identical rebuild is the same digest.
    attested = await farm.cli(*build_args(repo, "v1", base_image, "a"), str(context))
    assert attested.returncode != 0 and "is immutable (rule 'v*')" in attested.stderr
    plain = [*build_args(repo, "v1", base_image, "a"), "--provenance=false"]
    same = await farm.cli(*plain, str(context))
    assert same.returncode == 0, same.stderr  # the same digest again is no move
    assert same.stdout.strip().splitlines()[-1] == v1 == raw_digest(f"{repo}:v1")

    # mutable tags still move
    latest = await farm.cli(*build_args(repo, "latest", base_image, "c"), str(context))
    assert latest.returncode == 0, latest.stderr


@pytest.mark.parametrize("gated_farm", ["immutable"], indirect=True)
async def test_an_immutable_tag_created_while_the_build_runs_is_not_moved(
    gated_farm: Farm, registry, base_image: str, unique_repo: str, context: Path
) -> None:  # fmt: skip
    farm = gated_farm
    repo = f"{registry.address}/{unique_repo}"
    seed = await farm.cli(*build_args(repo, "seed", base_image, "seed"), str(context))
    assert seed.returncode == 0, seed.stderr
    seeded = raw_digest(f"{repo}:seed")
    slow = asyncio.create_task(
        farm.cli(*build_args(repo, "v2", base_image, "slow", pause=8), str(context))
    )
    manager = farm.coordinator.manager
    assert manager is not None

    async def running() -> bool:
        page = await manager.list_page(5, None)
        return any(f"{repo}:v2" in b.spec.tags and b.state is BuildState.RUNNING
                   for b, _ in page)  # fmt: skip

    await poll_until(running, timeout=120, message="the slow build runs")
    copied = await asyncio.to_thread(
        subprocess.run,
        [SKOPEO_BINARY, "copy", "--all", "--src-tls-verify=false", "--dest-tls-verify=false",
         "--src-no-creds", "--dest-no-creds", f"docker://{repo}:seed", f"docker://{repo}:v2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    assert not slow.done(), "the build ended before the tag was created: make it slower"
    result = await slow
    assert result.returncode != 0
    assert f"tag {repo}:v2 is immutable (rule 'v*') and already points at {seeded}" in (
        result.stderr
    )
    assert raw_digest(f"{repo}:v2") == seeded

"""`polyarch bake` on a real farm: targets built at once, indexes checked with skopeo."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from polyarch.agent.builders.docker import DockerBuilder
from tests.support.farm import Farm
from tests.support.services import SKOPEO_BINARY, Registry
from tests.support.verify import index_platforms, skopeo_missing, skopeo_raw

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
# a second Dockerfile in the same context: its build arg lands in a label skopeo can read
VARIANT = """\
ARG BASE
FROM ${BASE}
ARG GREETING=none
LABEL org.example.greeting=${GREETING}
COPY greeting.txt /variant.txt
"""
BROKEN = """\
ARG BASE
FROM ${BASE}
RUN echo "this step fails" && exit 7
"""


def image_config(reference: str) -> dict[str, Any]:
    """The image config at reference, read by skopeo."""
    done = subprocess.run(
        [SKOPEO_BINARY, "inspect", "--config", "--tls-verify=false", "--no-creds",
         f"docker://{reference}"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    config: dict[str, Any] = json.loads(done.stdout)
    return config


def context_with(tmp_path: Path, **dockerfiles: str) -> Path:
    """examples/hello copied, plus Dockerfile.<name> for each keyword."""
    context = tmp_path / "context"
    shutil.copytree(EXAMPLE, context)
    for name, text in dockerfiles.items():
        (context / f"Dockerfile.{name}").write_text(text)
    return context


HCL = """\
variable "TAG" {
  default = "dev"
}
group "default" {
  targets = ["apps"]
}
group "apps" {
  targets = ["hello", "variant"]
}
target "_common" {
  context = "%(context)s"
  args = { BASE = "%(base)s" }
  platforms = ["linux/amd64", "linux/arm64"]
}
target "hello" {
  inherits = ["_common"]
  tags = ["%(repo)s-hello:${TAG}"]
}
target "variant" {
  inherits = ["_common"]
  dockerfile = "Dockerfile.variant"
  args = { GREETING = "from-bake" }
  tags = ["%(repo)s-variant:${TAG}"]
}
"""


@pytest.mark.emulated
async def test_two_targets_for_two_platforms_are_built_at_once_and_both_indexes_pushed(
    farm: Farm,
    docker_binary: str,
    registry: Registry,
    base_image: str,
    unique_repo: str,
    tmp_path: Path,
) -> None:
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=4)  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    context = context_with(tmp_path, variant=VARIANT)
    bake_file = tmp_path / "docker-bake.hcl"
    bake_file.write_text(HCL % {"context": context, "base": base_image, "repo": repo})
    metadata = tmp_path / "metadata.json"
    result = await farm.cli(
        "bake", str(bake_file), "--metadata-file", str(metadata), env={"TAG": "v1"}
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads(metadata.read_text())
    assert sorted(meta) == ["hello", "variant"]
    # submitted at once: each build was created before either had finished
    listed_builds = json.loads((await farm.cli("builds", "--json")).stdout)
    builds = {b["id"]: b for b in listed_builds}
    ours = [builds[meta[target]["polyarch.build.id"]] for target in ("hello", "variant")]
    assert max(b["created_at"] for b in ours) < min(b["finished_at"] for b in ours)
    digests = {}
    for target in ("hello", "variant"):
        index = skopeo_raw(f"{repo}-{target}:v1")  # the tag from the file's variable, via $TAG
        listed = index_platforms(index)
        assert sorted(listed) == ["linux/amd64", "linux/arm64"], target
        assert meta[target]["containerimage.digest"] == skopeo_digest(f"{repo}-{target}:v1")
        assert meta[target]["buildx.build.ref"].startswith(f"polyarch/{farm.address}/")
        assert {p: d["digest"] for p, d in meta[target]["polyarch.platforms"].items()} == listed
        digests[target] = meta[target]["containerimage.digest"]
        # each line of progress names its target, then its platform
        assert f"[{target}] [linux/arm64] pushed sha256:" in result.stderr
        assert f"{target} {digests[target]}" in result.stdout.splitlines()
    assert digests["hello"] != digests["variant"]
    # the variant's own Dockerfile and build arg, on both platforms
    for platform, child in index_platforms(skopeo_raw(f"{repo}-variant:v1")).items():
        config = image_config(f"{repo}-variant@{child}")
        assert config["config"]["Labels"]["org.example.greeting"] == "from-bake", platform
        assert config["architecture"] == platform.split("/")[1]
    hello_child = index_platforms(skopeo_raw(f"{repo}-hello:v1"))["linux/amd64"]
    assert "org.example.greeting" not in (image_config(f"{repo}-hello@{hello_child}")["config"]
                                          .get("Labels") or {})  # fmt: skip


def skopeo_digest(reference: str) -> str:
    done = subprocess.run(
        [SKOPEO_BINARY, "inspect", "--tls-verify=false", "--no-creds", "--format", "{{.Digest}}",
         f"docker://{reference}"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.strip()


async def test_a_failed_target_fails_the_run_by_name_and_the_other_is_still_pushed(
    farm: Farm,
    docker_binary: str,
    registry: Registry,
    base_image: str,
    unique_repo: str,
    tmp_path: Path,
) -> None:
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"],
                         slots=2)  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    context = context_with(tmp_path, broken=BROKEN)
    common = {"context": str(context), "args": {"BASE": base_image}, "platforms": ["linux/amd64"]}
    document = {
        "target": {
            "good": {**common, "tags": [f"{repo}-good:v1"]},
            "broken": {**common, "dockerfile": "Dockerfile.broken", "tags": [f"{repo}-broken:v1"]},
        }
    }
    bake_file = tmp_path / "docker-bake.json"
    bake_file.write_text(json.dumps(document))
    metadata = tmp_path / "metadata.json"
    result = await farm.cli(
        "bake", "-f", str(bake_file), "good", "broken", "--metadata-file", str(metadata)
    )
    assert result.returncode == 1, result.stderr
    assert "polyarch: error: 1 of 2 targets failed: broken" in result.stderr
    # the summary names the target, its platform and step; its builder's log is prefixed too
    assert '[broken]   linux/amd64: FAILED at step "[2/2] RUN echo' in result.stderr
    assert re.search(r"^\[broken\] \[linux/amd64\] .*this step fails$", result.stderr, re.M)
    assert not re.search(r"^\[good\] .*(FAILED|this step fails)", result.stderr, re.M)
    # the good target finished, was pushed and is reported, on stdout and in the metadata
    meta = json.loads(metadata.read_text())
    assert list(meta) == ["good"]
    assert meta["good"]["containerimage.digest"] == skopeo_digest(f"{repo}-good:v1")
    assert result.stdout.splitlines() == [f"good {meta['good']['containerimage.digest']}"]
    assert sorted(index_platforms(skopeo_raw(f"{repo}-good:v1"))) == ["linux/amd64"]
    assert skopeo_missing(f"{repo}-broken:v1")


async def test_a_target_with_named_contexts_is_refused_before_anything_is_submitted(
    farm: Farm, unique_repo: str, tmp_path: Path
) -> None:
    document = {
        "target": {
            "plain": {"context": str(EXAMPLE), "tags": ["r/plain"], "platforms": ["linux/amd64"]},
            "named": {"context": str(EXAMPLE), "tags": ["r/named"], "platforms": ["linux/amd64"],
                      "contexts": {"src": str(EXAMPLE)}},
        }
    }  # fmt: skip
    bake_file = tmp_path / "bake.json"
    bake_file.write_text(json.dumps(document))
    result = await farm.cli("bake", str(bake_file), "plain", "named")
    assert result.returncode == 2, result.stderr
    assert "target named: named build contexts (contexts) are not supported" in result.stderr
    builds = await farm.cli("builds", "--json")
    assert json.loads(builds.stdout) == []
    printed = await farm.cli("bake", str(bake_file), "named", "--print")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["target"]["named"]["contexts"] == {"src": str(EXAMPLE)}

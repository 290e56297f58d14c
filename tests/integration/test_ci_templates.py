"""The CI templates on a real farm: the GitHub action's steps and the GitLab template's
script run as their runners run them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import string
import subprocess
from pathlib import Path

import pytest
import yaml

from polyarch.agent.builders.docker import DockerBuilder
from tests.support.farm import Farm
from tests.support.poll import poll_until
from tests.support.verify import skopeo_raw, skopeo_tags

ROOT = Path(__file__).resolve().parents[2]
ACTION = ROOT / "deploy" / "ci" / "github" / "action.yml"
EXAMPLE = ROOT / "examples" / "hello"
VENV_BIN = ROOT / ".venv" / "bin"


def action_step(inputs: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The build step's `run` and its env, with `${{ inputs.X }}` resolved as a runner does:
    the caller's value, else the input's default. (The file's layout is ours, so a small
    reader does; no YAML library is a dependency.)"""
    text = ACTION.read_text()
    defaults = dict(re.findall(r"^  ([a-z-]+):\n(?:    .*\n)*?    default: (.*)$", text, re.M))
    values = {name: value.strip('"') for name, value in defaults.items()} | inputs
    step = text[text.index("    - id: build") :]
    run = re.search(r"^      run: (.*)$", step, re.M)
    assert run is not None
    env = {
        key: values.get(name, "")
        for key, name in re.findall(
            r"^        ([A-Z_]+): \$\{\{ inputs\.([a-z-]+) \}\}$", step, re.M
        )
    }
    return run[1], env


async def run_action(inputs: dict[str, str], tmp_path: Path) -> tuple[int, str, dict[str, str]]:
    """Runs the build step in bash with the runner's variables; returns (exit, stderr, outputs)."""
    command, env = action_step(inputs)
    outputs = tmp_path / "github_output"
    outputs.write_text("")
    full_env = {
        **os.environ, **env, "GITHUB_ACTION_PATH": str(ACTION.parent),
        "GITHUB_OUTPUT": str(outputs), "RUNNER_TEMP": str(tmp_path),
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
    }  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", command], env=full_env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    return done.returncode, done.stderr, parse_outputs(outputs.read_text())


def parse_outputs(text: str) -> dict[str, str]:
    """GITHUB_OUTPUT's format: NAME=value lines and NAME<<DELIMITER blocks."""
    found, lines = {}, iter(text.splitlines())
    for line in lines:
        if "<<" in line:
            name, delimiter = line.split("<<", 1)
            block = []
            for inner in lines:
                if inner == delimiter:
                    break
                block.append(inner)
            found[name] = "\n".join(block)
        elif "=" in line:
            name, value = line.split("=", 1)
            found[name] = value
    return found


@pytest.mark.emulated
async def test_the_github_action_builds_pushes_and_reports_its_outputs(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("docker-agent", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    token = farm.admin_token_file.read_text().strip()
    inputs = {
        "coordinator": farm.address,
        "token": token,
        "context": str(EXAMPLE),
        "platforms": "linux/amd64\nlinux/arm64",
        "tags": f"{repo}:v1,{repo}:latest",
        "build-args": f"BASE={base_image}\nBUILD_ID=action",
        "labels": "org.example.from=action",
        "annotations": "index:org.opencontainers.image.description=built by the action",
        "secrets": "UNUSED_TOKEN=s3cr3t-value",
    }
    code, stderr, outputs = await run_action(inputs, tmp_path)
    assert code == 0, stderr
    assert "s3cr3t-value" not in stderr  # a secret travels in a file, never on a command line
    index = skopeo_raw(f"{repo}:latest")
    assert index["annotations"] == {"org.opencontainers.image.description": "built by the action"}
    assert outputs["digest"] == outputs["imageid"]
    assert skopeo_raw(f"{repo}@{outputs['digest']}") == index  # the digest is what v1 holds
    metadata = json.loads(outputs["metadata"])
    assert metadata["containerimage.digest"] == outputs["digest"]
    assert sorted(metadata["polyarch.platforms"]) == ["linux/amd64", "linux/arm64"]


async def test_the_github_action_with_push_false_builds_and_publishes_no_tag(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("docker-agent", DockerBuilder(docker_binary), native=["linux/amd64"])
    repo = f"{registry.address}/{unique_repo}"
    inputs = {
        "coordinator": farm.address, "token": farm.admin_token_file.read_text().strip(),
        "context": str(EXAMPLE), "platforms": "linux/amd64", "tags": f"{repo}:pr-1",
        "build-args": f"BASE={base_image}", "push": "false",
    }  # fmt: skip
    code, stderr, outputs = await run_action(inputs, tmp_path)
    assert code == 0, stderr
    metadata = json.loads(outputs["metadata"])
    image = metadata["polyarch.platforms"]["linux/amd64"]["digest"]
    assert skopeo_raw(f"{repo}@{image}")["layers"]  # built and pushed by digest, verified
    await poll_until(lambda: skopeo_tags(repo) == [], timeout=30,
                     message="a pull-request build left a tag")  # fmt: skip


GITLAB = ROOT / "deploy" / "ci" / "gitlab" / "polyarch.gitlab-ci.yml"


def gitlab_job(variables: dict[str, str], predefined: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The template's script as a runner runs it (each line in one sh, stopping at the first
    failure), with its variables: the job's over the template's defaults, `$VAR` in the
    defaults expanded from the job's and the predefined ones, as GitLab does."""
    template = yaml.safe_load(GITLAB.read_text())[".polyarch-build"]
    values = {**{k: str(v) for k, v in template["variables"].items()}, **variables}
    known = {**predefined, **values}
    expanded = {k: string.Template(v).safe_substitute(known) for k, v in values.items()}
    script = "set -e\n" + "\n".join(template["script"]) + "\n"
    return script, expanded


@pytest.mark.parametrize("push", ["true", "false"])
async def test_the_gitlab_template_s_script_builds_and_reports_the_digest(
    farm: Farm,
    docker_binary: str,
    registry,
    base_image: str,
    unique_repo: str,
    tmp_path: Path,
    push: str,
) -> None:
    await farm.add_agent("docker-agent", DockerBuilder(docker_binary), native=["linux/amd64"])
    repo = f"{registry.address}/{unique_repo}"
    predefined = {"CI_REGISTRY_IMAGE": repo, "CI_COMMIT_REF_SLUG": "main"}
    script, variables = gitlab_job({
        "POLYARCH_CONTEXT": str(EXAMPLE), "POLYARCH_PLATFORMS": "linux/amd64",
        "POLYARCH_BUILD_ARGS": f"BASE={base_image} BUILD_ID=gitlab", "POLYARCH_PUSH": push,
        "POLYARCH_COORDINATOR": farm.address, "POLYARCH_TOKEN": farm.admin_token,
    }, predefined)  # fmt: skip
    env = {**os.environ, **predefined, **variables, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("POLYARCH_TOKEN_FILE", None)
    done = await asyncio.to_thread(
        subprocess.run, ["sh", "-c", script], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert variables["POLYARCH_TAGS"] == f"{repo}:main"  # the default tag, expanded
    report = (tmp_path / "polyarch.env").read_text()
    digest = report.removeprefix("POLYARCH_DIGEST=").strip()
    metadata = json.loads((tmp_path / "polyarch-metadata.json").read_text())
    assert digest == metadata["containerimage.digest"] and digest.startswith("sha256:")
    if push == "true":
        assert skopeo_raw(f"{repo}:main")["manifests"][0]["platform"]["architecture"] == "amd64"
    else:
        await poll_until(lambda: skopeo_tags(repo) == [], timeout=30,
                         message="a merge-request build left a tag")  # fmt: skip

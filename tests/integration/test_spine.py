"""End to end on real parts: CLI, coordinator, agents (BuildKit, buildah, QEMU), registry."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from polyarch.agent.builders.buildah import BuildahBuilder
from polyarch.agent.builders.docker import DockerBuilder
from tests.support.farm import Farm, builder_named
from tests.support.poll import poll_until
from tests.support.services import free_port
from tests.support.verify import docker_run_uname, index_platforms, skopeo_missing, skopeo_raw

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
THREE = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
UNAME = {"linux/amd64": "x86_64", "linux/arm64": "aarch64", "linux/arm/v7": "armv7l"}


@pytest.mark.emulated
@pytest.mark.parametrize("backend", ["docker", "buildah"])
async def test_three_platform_build_publishes_a_verified_index(
    farm: Farm, backend: str, docker_binary: str, registry, base_image: str, unique_repo: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    await farm.add_agent(
        f"{backend}-agent", builder_named(backend, docker_binary),
        native=["linux/amd64"], emulated=["linux/arm64", "linux/arm/v7"], slots=3,
    )  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    metadata_file = tmp_path / "metadata.json"
    result = await farm.cli(
        "build", "--platform", ",".join(THREE), "-t", f"{repo}:v1", "-t", f"{repo}:latest",
        "--build-arg", f"BASE={base_image}", "--metadata-file", str(metadata_file), str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    index_digest = result.stdout.strip().splitlines()[-1]
    metadata = json.loads(metadata_file.read_text())
    assert metadata["containerimage.digest"] == index_digest
    assert metadata["image.name"] == f"{repo}:v1,{repo}:latest"
    reported = {p: v["digest"] for p, v in metadata["polyarch.platforms"].items()}
    assert sorted(reported) == sorted(THREE), metadata
    assert {v["mode"] for p, v in metadata["polyarch.platforms"].items() if p != "linux/amd64"} == {
        "emulated"
    }
    for tag in ("v1", "latest"):
        index = skopeo_raw(f"{repo}:{tag}")
        assert index_platforms(index) == reported, (tag, index, metadata)
    for platform, machine in UNAME.items():
        assert docker_run_uname(docker_binary, f"{repo}:v1", platform) == machine
    # the live progress named every platform, its agent and its mode
    for platform in THREE:
        assert f"[{platform}]" in result.stderr
    assert "emulated" in result.stderr


async def test_native_agent_is_preferred_over_an_emulating_one(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("emulator", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    await farm.add_agent("arm-native", DockerBuilder(docker_binary), native=["linux/arm64"])
    metadata_file = tmp_path / "metadata.json"
    result = await farm.cli(
        "build", "--platform", "linux/arm64", "-t", f"{registry.address}/{unique_repo}:1",
        "--build-arg", f"BASE={base_image}", "--metadata-file", str(metadata_file), str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    placed = json.loads(metadata_file.read_text())["polyarch.platforms"]["linux/arm64"]
    assert (placed["agent"], placed["mode"]) == ("arm-native", "native")


@pytest.mark.emulated
async def test_one_failing_platform_publishes_nothing_and_keeps_the_others(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("agent", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "ARG BASE\nFROM ${BASE}\nRUN echo preparing\n"
        'RUN if [ "$(uname -m)" = aarch64 ]; then echo "no arm64 today" >&2; exit 3; fi\n'
    )
    tag = f"{registry.address}/{unique_repo}:broken"
    result = await farm.cli(
        "build", "--platform", "linux/amd64,linux/arm64", "-t", tag,
        "--build-arg", f"BASE={base_image}", str(context),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "linux/arm64" in result.stderr
    assert "RUN if" in result.stderr  # the failing step is named
    assert "agent" in result.stderr
    assert skopeo_missing(tag)
    listed = json.loads((await farm.cli("builds", "--json")).stdout)
    build = listed[0] if isinstance(listed, list) else listed["builds"][0]
    jobs = {j["platform"]: j for j in build["platforms" if "platforms" in build else "jobs"]}
    assert build["state"] == "failed"
    assert jobs["linux/amd64"]["state"] == "pushed"
    assert jobs["linux/amd64"]["digest"].startswith("sha256:")
    assert jobs["linux/arm64"]["state"] == "failed"
    # the farm stays healthy: the agent is still connected and takes the next build
    agents = json.loads((await farm.cli("agents", "--json")).stdout)
    assert [a["name"] for a in agents] == ["agent"]


async def test_unschedulable_platform_fails_the_submit_naming_it(
    farm: Farm, docker_binary: str, registry, unique_repo: str
) -> None:
    await farm.add_agent("amd-only", DockerBuilder(docker_binary), native=["linux/amd64"])
    result = await farm.cli(
        "build", "--platform", "linux/amd64,linux/s390x", "-t",
        f"{registry.address}/{unique_repo}:x", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode != 0
    assert "linux/s390x" in result.stderr
    assert "no connected agent" in result.stderr


async def test_unreachable_registry_fails_with_a_clear_push_error(
    farm: Farm, docker_binary: str, base_image: str, tmp_path: Path
) -> None:
    await farm.add_agent("agent", DockerBuilder(docker_binary), native=["linux/amd64"])
    tag = f"127.0.0.1:{free_port()}/polyarch-test/unreachable:1"
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", tag, "--build-arg", f"BASE={base_image}",
        str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 1
    assert "push" in result.stderr
    assert "linux/amd64" in result.stderr


async def test_registry_refusing_auth_fails_with_a_clear_error(
    farm: Farm, docker_binary: str, auth_registry, base_image: str, unique_repo: str
) -> None:
    await farm.add_agent("agent", BuildahBuilder(), native=["linux/amd64"])
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{auth_registry.address}/{unique_repo}:1",
        "--build-arg", f"BASE={base_image}", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 1
    assert "push" in result.stderr
    assert auth_registry.password not in result.stderr


async def test_metrics_endpoint_reports_the_build(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str
) -> None:
    await farm.add_agent("agent", DockerBuilder(docker_binary), native=["linux/amd64"])
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{registry.address}/{unique_repo}:m",
        "--build-arg", f"BASE={base_image}", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = await scrape(farm.coordinator.metrics_port)
    finished = (
        "polyarch_jobs_finished_total",
        (("mode", "native"), ("platform", "linux/amd64"), ("result", "pushed")),
    )
    assert samples[finished] == 1
    assert samples[("polyarch_builds_finished_total", (("result", "succeeded"),))] == 1
    assert samples[("polyarch_agent_slots", (("agent", "agent"),))] == 2
    assert samples[("polyarch_context_bytes_received_total", ())] > 0
    assert samples[("polyarch_index_assembly_seconds_count", ())] == 1


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=10)).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_agent_process_exports_its_own_metrics(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str
) -> None:
    port = free_port()
    await farm.spawn_agent_process("metered", docker_binary, "--metrics-listen",
                                   f"127.0.0.1:{port}")  # fmt: skip
    manager = farm.coordinator.manager
    assert manager is not None
    await poll_until(lambda: "metered" in manager.sessions, timeout=30,
                     message="the agent process never connected")  # fmt: skip
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{registry.address}/{unique_repo}:a",
        "--build-arg", f"BASE={base_image}", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = await scrape(port)
    pushed = ("polyarch_agent_jobs_total", (("platform", "linux/amd64"), ("result", "pushed")))
    assert samples[pushed] == 1
    assert samples[("polyarch_agent_connected", ())] == 1
    assert samples[("polyarch_agent_build_slots", ())] == 2
    assert samples[("polyarch_agent_build_slots_in_use", ())] == 0
    assert samples[("polyarch_agent_context_bytes_fetched_total", ())] > 0

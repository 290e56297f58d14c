"""The farm builds images of polyarch itself (deploy/docker/) from the offline Python base."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from polyarch.agent.builders.docker import DockerBuilder
from polyarch.ops.wheelhouse import WheelTarget, build_wheelhouse
from polyarch.proto.registries import polyarch_version
from polyarch.proto.trust import Role
from tests.support.compose_farm import running_compose_farm
from tests.support.farm import Farm
from tests.support.poll import PollTimeout, poll_until, wait_until
from tests.support.verify import docker_run, index_platforms, skopeo_raw

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
DOCKER_DIR = DEPLOY_DIR / "docker"
PROBES_DIR = DEPLOY_DIR / "kubernetes" / "probes"
PLATFORMS = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}
# Compressed, per platform: the base is about 46 MB and the venv about 15 MB. A guard against
# a wheel or a pip cache landing in a layer, not a target.
MAX_IMAGE_BYTES = 100_000_000
# The agent's base adds buildah and its Go libraries to that.
MAX_AGENT_IMAGE_BYTES = 150_000_000
# What deploy/compose and the agent DaemonSets grant the agent container, and nothing more.
AGENT_GRANTS = (
    "--cap-drop", "ALL", "--cap-add", "SETUID", "--cap-add", "SETGID",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
)  # fmt: skip


@pytest.fixture(scope="module")
def image_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the images build from: wheels/ for both arches side by side (pip picks each
    platform's wheels by their tags inside that platform's build) and probes/, a copy of
    deploy/kubernetes/probes (the coordinator and agent images carry them)."""
    directory = tmp_path_factory.mktemp("image-context")
    for arch in ("amd64", "arm64"):
        build_wheelhouse(directory / "wheels", WheelTarget.parse("3.11", arch))
    shutil.copytree(PROBES_DIR, directory / "probes")
    return directory


@pytest.mark.emulated
@pytest.mark.timeout(900)  # a cold python base runs arm64 package scripts under QEMU
async def test_the_farm_builds_an_image_of_its_own_cli_that_runs_on_amd64_and_arm64(
    farm: Farm, docker_binary: str, registry, python_base_image: str, unique_repo: str,
    image_context: Path,
) -> None:  # fmt: skip
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    reference = f"{registry.address}/{unique_repo}:v1"
    result = await farm.cli(
        "build", "--platform", ",".join(PLATFORMS), "-t", reference,
        "-f", str(DOCKER_DIR / "cli.Dockerfile"), "--build-arg", f"BASE={python_base_image}",
        str(image_context),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    # Read back by independent clients: skopeo for the index, docker for each platform.
    index = skopeo_raw(reference)
    children = index_platforms(index)
    assert sorted(children) == sorted(PLATFORMS)
    for child in children.values():
        manifest = skopeo_raw(f"{registry.address}/{unique_repo}@{child}")
        assert sum(layer["size"] for layer in manifest["layers"]) < MAX_IMAGE_BYTES
    pulled: list[str] = []
    try:
        for platform, machine in PLATFORMS.items():
            version = docker_run(docker_binary, reference, platform, "--version")
            assert version == f"polyarch {polyarch_version()}"
            # grpc's compiled core loads: pip took this platform's wheels, not the other's.
            probe = "import platform, grpc._cython.cygrpc; print(platform.machine())"
            python = "/opt/polyarch/bin/python"
            ran = docker_run(docker_binary, reference, platform, "-c", probe, entrypoint=python)
            assert ran == machine
            pulled.append(image_id(docker_binary, reference))
    finally:
        # The pulls are the test's own (the tag moves to each platform's image in turn, so
        # remove them by id): leave dockerd's image store as it was.
        await asyncio.to_thread(remove_images, docker_binary, [*pulled, reference])


@pytest.mark.emulated
@pytest.mark.timeout(1500)  # cold: both Debian bases for arm64 under QEMU, then arm64 pip installs
async def test_the_farm_builds_its_coordinator_and_agent_images_which_run_alone_and_composed(
    farm: Farm, docker_binary: str, registry, python_base_image: str, agent_base_image: str,
    base_image: str, unique_repo: str, image_context: Path, tmp_path: Path,
) -> None:  # fmt: skip
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    prefix = f"{registry.address}/{unique_repo}/"
    images = {
        # named as deploy/compose/compose.yaml names them, which runs them below
        "coordinator": (f"{prefix}polyarch-coordinator:v1", python_base_image),
        "agent": (f"{prefix}polyarch-agent:v1", agent_base_image),
    }
    # Both builds at once: four jobs on the agent's two slots, as an operator would run them.
    results = await asyncio.gather(*(
        farm.cli(
            "build", "--platform", ",".join(PLATFORMS), "-t", reference,
            "-f", str(DOCKER_DIR / f"{name}.Dockerfile"), "--build-arg", f"BASE={base}",
            str(image_context),
        )
        for name, (reference, base) in images.items()
    ))  # fmt: skip
    for result in results:
        assert result.returncode == 0, result.stderr
    for reference, _ in images.values():
        children = index_platforms(skopeo_raw(reference))
        assert sorted(children) == sorted(PLATFORMS)
        repository = reference.rpartition(":")[0]
        for child in children.values():
            manifest = skopeo_raw(f"{repository}@{child}")
            assert sum(layer["size"] for layer in manifest["layers"]) < MAX_AGENT_IMAGE_BYTES

    coordinator, agent = images["coordinator"][0], images["agent"][0]
    pulled: list[str] = []
    containers: list[str] = []
    try:
        # The coordinator as deployed: TLS on, its own CA, non-root, and the image's own
        # HEALTHCHECK (run every second here instead of every 15 s).
        container = await docker(
            docker_binary, "run", "-d", "--pull", "always", "--platform", "linux/amd64",
            "--health-interval", "1s", "-p", "127.0.0.1::7600", coordinator,
        )  # fmt: skip
        containers.append(container)
        pulled.append(await docker(docker_binary, "inspect", "--format", "{{.Image}}", container))
        status = await poll_until(
            lambda: health_once_decided(docker_binary, container), timeout=90, interval=0.5,
            message="the coordinator container's health check decides",
        )  # fmt: skip
        assert status == "healthy", await logs(docker_binary, container)
        assert await docker(docker_binary, "exec", container, "id", "-u") == "10001"
        # And from the host through the published port, verified against the CA it made.
        published = await docker(docker_binary, "port", container, "7600/tcp")
        ca = tmp_path / "ca.pem"
        ca_in_container = "/var/lib/polyarch/coordinator/tls/ca.pem"
        await docker(docker_binary, "cp", f"{container}:{ca_in_container}", str(ca))
        probe = await asyncio.create_subprocess_exec(
            sys.executable, str(PROBES_DIR / "coordinator_health.py"),
            f"127.0.0.1:{published.rpartition(':')[2]}", str(ca), stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(probe.communicate(), 60)
        assert probe.returncode == 0, err.decode()

        pulled += await asyncio.to_thread(check_platforms, docker_binary, coordinator, agent)

        # The agent image as the farm's only agent, with exactly the compose and Kubernetes
        # grants: rootless buildah (a RUN step in chroot isolation, kernel overlay in its user
        # namespace on the image's work volume) builds and pushes an image. Host network: the
        # farm and its registry listen on 127.0.0.1.
        await farm.stop_agent("docker-1")
        agent_container = await docker(
            docker_binary, "run", "-d", "--pull", "always", "--platform", "linux/amd64",
            "--network", "host", *AGENT_GRANTS, "-e", f"POLYARCH_TOKEN={farm.token(Role.AGENT)}",
            agent, "agent", "--coordinator", farm.address, "--name", "in-image",
            "--builder", "buildah", "--native", "linux/amd64", "--emulated", "none",
        )  # fmt: skip
        containers.append(made := agent_container)
        pulled.append(await docker(docker_binary, "inspect", "--format", "{{.Image}}", made))
        manager = farm.coordinator.manager
        assert manager is not None
        try:
            await poll_until(
                lambda: "in-image" in manager.sessions, timeout=60, interval=0.2,
                message="the agent in its image connects to the coordinator",
            )  # fmt: skip
        except PollTimeout as exc:
            pytest.fail(f"{exc}\nthe agent container's log:\n{await logs(docker_binary, made)}")
        small = tmp_path / "small"
        small.mkdir()
        (small / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo built > /built\n")
        built = f"{registry.address}/{unique_repo}/small:v1"
        result = await farm.cli("build", "--platform", "linux/amd64", "-t", built, str(small))
        if result.returncode != 0:
            log = await logs(docker_binary, made)
            pytest.fail(f"{result.stderr}\nthe agent container's log:\n{log}")
        assert list(index_platforms(skopeo_raw(built))) == ["linux/amd64"]

        # The same images as deploy/compose's whole farm, run with Docker Compose
        await asyncio.to_thread(compose_farm_builds, tmp_path / "compose", prefix, base_image)
    finally:
        # The containers (with their anonymous data volumes) and the pulls are the test's own:
        # leave dockerd as it was.
        for made in containers:
            await docker(docker_binary, "rm", "-f", "-v", made)
        await asyncio.to_thread(remove_images, docker_binary, [*pulled, coordinator, agent])


def compose_farm_builds(work: Path, prefix: str, base_image: str) -> None:
    """deploy/compose/compose.yaml started as its header says, on the farm's own images:
    both agents ready, a build through it in its registry, and its Prometheus scraping every
    polyarch service with the alert rules loaded and the build counted."""
    with running_compose_farm(work, prefix, "v1") as compose:
        copied = subprocess.run(
            ["skopeo", "copy", "--all", "--src-tls-verify=false", "--dest-tls-verify=false",
             f"docker://{base_image}", f"docker://{compose.registry}/polyarch/busybox:latest"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert copied.returncode == 0, copied.stderr
        context = work / "context"
        context.mkdir()
        # inside the compose network the registry is registry:5000 (agents push there)
        (context / "Dockerfile").write_text(
            "FROM registry:5000/polyarch/busybox:latest\nRUN echo compose > /built\n"
        )
        metadata = work / "metadata.json"
        built = compose.cli("build", "--platform", "linux/amd64", "-t", "registry:5000/smoke:1",
                            "--metadata-file", str(metadata), str(context))  # fmt: skip
        assert built.returncode == 0, built.stderr + compose.logs()
        assert list(index_platforms(skopeo_raw(f"{compose.registry}/smoke:1"))) == ["linux/amd64"]
        platforms = json.loads(metadata.read_text())["polyarch.platforms"]
        assert platforms["linux/amd64"]["agent"] in ("agent-1", "agent-2")

        def scraped() -> bool:
            targets = compose.prometheus_get("/api/v1/targets")["activeTargets"]
            return sorted((t["labels"]["job"], t["health"]) for t in targets) == [
                ("polyarch-agent", "up"), ("polyarch-agent", "up"),
                ("polyarch-coordinator", "up"),
            ]  # fmt: skip

        wait_until(scraped, timeout=90, interval=1.0, ignore=(httpx.HTTPError,),
                   message="compose Prometheus scrapes the coordinator and agents")  # fmt: skip
        groups = {g["name"] for g in compose.prometheus_get("/api/v1/rules")["groups"]}
        assert {"polyarch.recording", "polyarch.alerts"} <= groups

        def counted() -> float:
            result = compose.prometheus_get(
                "/api/v1/query", query='polyarch_builds_finished_total{result="succeeded"}'
            )["result"]
            return float(result[0]["value"][1]) if result else 0.0

        wait_until(lambda: counted() >= 1, timeout=60, interval=1.0,
                   message="the finished build in compose Prometheus")  # fmt: skip


def check_platforms(docker_binary: str, coordinator: str, agent: str) -> list[str]:
    """Runs both images on each platform; returns the ids of the images it pulled."""
    pulled: list[str] = []
    for platform, machine in PLATFORMS.items():
        version = docker_run(docker_binary, coordinator, platform, "--version")
        assert version == f"polyarch {polyarch_version()}"
        pulled.append(image_id(docker_binary, coordinator))
        version = docker_run(docker_binary, agent, platform, "--version")
        assert version == f"polyarch {polyarch_version()}"
        pulled.append(image_id(docker_binary, agent))
        probe = "buildah --version && uname -m"
        ran = docker_run(docker_binary, agent, platform, "-c", probe, entrypoint="/bin/sh")
        assert ran.startswith("buildah version ") and ran.endswith(f"\n{machine}"), ran
        if platform == "linux/amd64":
            # Rootless buildah with exactly what compose and the DaemonSets grant: uid 1000,
            # SETUID/SETGID for newuidmap/newgidmap, no seccomp/AppArmor filter. Its user
            # namespace maps the subordinate ranges of /etc/subuid and /etc/subgid (buildah
            # would fall back to one id, with only a warning, if the helpers failed).
            maps = subprocess.run(
                [docker_binary, "run", "--rm", "--platform", platform, *AGENT_GRANTS,
                 "--entrypoint", "buildah", agent, "unshare", "cat", "/proc/self/uid_map",
                 "/proc/self/gid_map"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert maps.returncode == 0, maps.stderr
            assert maps.stdout.split() == ["0", "1000", "1", "1", "100000", "65536"] * 2, maps
    return pulled


async def docker(binary: str, *args: str) -> str:
    """`docker ARGS...`'s stdout, stripped; a failure fails the test with docker's words."""
    done = await asyncio.to_thread(
        subprocess.run, [binary, *args], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


async def logs(binary: str, container: str) -> str:
    """A container's output, stdout and stderr together (for failure messages)."""
    done = await asyncio.to_thread(
        subprocess.run, [binary, "logs", container], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=60,
    )  # fmt: skip
    return done.stdout[-6000:]


async def health_once_decided(docker_binary: str, container: str) -> str | None:
    """The container's health once decided ("healthy", "unhealthy"), its state if it stopped
    running ("exited"), or None while it is still starting."""
    template = "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"
    state = await docker(docker_binary, "inspect", "--format", template, container)
    status, _, health = state.partition(" ")
    if status != "running":
        return status
    return health if health in ("healthy", "unhealthy") else None


def remove_images(docker: str, references: list[str]) -> None:
    subprocess.run([docker, "rmi", *references], capture_output=True, timeout=60)


def image_id(docker: str, reference: str) -> str:
    done = subprocess.run([docker, "image", "inspect", "--format", "{{.Id}}", reference],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return done.stdout.strip()

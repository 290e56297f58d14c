"""buildx's flags on real builders through the farm: --no-cache and --pull, rawjson, metadata."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path

import pytest

from polyarch.agent.builders.buildah import BuildahBuilder
from polyarch.agent.builders.docker import DockerBuilder
from polyarch.agent.runtime import make_builder
from tests.support import services
from tests.support.farm import Farm, builder_named
from tests.support.poll import poll_until
from tests.support.verify import docker_run_uname, image_entries, skopeo_raw, skopeo_tags

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
_BUILDAH_STEP = re.compile(r"^(\[\d+/\d+\] )?STEP ")  # `[1/2] STEP 2/2: ...` in multi-stage
# Two stages: the RUN is in the one the image does not keep, which only a mode=max export
# caches (buildx's mode=min exports the final image's layers). No ARG inside a stage:
# buildah before 1.29.1 never takes a remote cache for steps after one (buildah#4315).
TWO_STAGES = """\
ARG BASE
FROM ${BASE} AS compile
RUN echo "compiled on $(uname -m)" > /out
FROM ${BASE}
COPY --from=compile /out /out
CMD ["cat", "/out"]
"""


def platform_log(log: str, platform: str) -> str:
    """The lines of one platform's builder in a [platform]-prefixed log."""
    return "\n".join(line for line in log.splitlines() if line.startswith(f"[{platform}] "))


def run_step_cached(backend: str, log: str) -> bool:
    """Whether the RUN step of examples/hello came from the layer cache, as the builder said
    in the [platform]-prefixed log: BuildKit prints `#N CACHED` for step #N, buildah prints
    `--> Using cache` under the step. (A FROM is `CACHED` even with --no-cache, as in buildx.)"""
    lines = [line.partition("] ")[2] for line in log.splitlines() if line.startswith("[linux/")]
    if backend == "docker":
        steps = {m[1] for line in lines if (m := re.match(r"(#\d+) \[.*\] RUN echo", line))}
        assert steps, "the log shows no RUN step"
        return any(f"{step} CACHED" in lines for step in steps)
    at = next(i for i, line in enumerate(lines) if "RUN echo" in line)
    following = lines[at + 1 :]
    until = next((i for i, line in enumerate(following) if _BUILDAH_STEP.match(line)), None)
    return any("Using cache" in line for line in following[:until])


@pytest.mark.parametrize("backend", ["docker", "buildah"])
async def test_the_same_build_hits_the_cache_and_no_cache_rebuilds_every_step(
    farm: Farm, backend: str, docker_binary: str, registry, base_image: str, unique_repo: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    await farm.add_agent(f"{backend}-agent", builder_named(backend, docker_binary),
                         native=["linux/amd64"], slots=1)  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    build = [
        "build", "--platform", "linux/amd64", "-t", f"{repo}:v1",
        "--build-arg", f"BASE={base_image}", "--build-arg", f"BUILD_ID={secrets.token_hex(4)}",
    ]  # fmt: skip
    first = await farm.cli(*build, str(EXAMPLE))
    assert first.returncode == 0, first.stderr
    again = await farm.cli(*build, str(EXAMPLE))
    assert again.returncode == 0, again.stderr
    assert run_step_cached(backend, again.stderr), "the repeated build ran its RUN step again"
    metadata = tmp_path / "metadata.json"
    fresh = await farm.cli(*build, "--no-cache", "--pull", "--metadata-file", str(metadata),
                           str(EXAMPLE))  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    assert not run_step_cached(backend, fresh.stderr), "--no-cache reused the cached RUN step"
    meta = json.loads(metadata.read_text())
    digest = fresh.stdout.strip().splitlines()[-1]
    assert meta["containerimage.digest"] == digest
    assert meta["buildx.build.ref"] == f"polyarch/{farm.address}/{meta['polyarch.build.id']}"
    (child,) = image_entries(skopeo_raw(f"{repo}@{digest}"))
    # one platform: buildx's config digest key, as skopeo reads the image
    config = skopeo_raw(f"{repo}@{child['digest']}")["config"]["digest"]
    assert meta["containerimage.config.digest"] == config


async def test_rawjson_progress_is_one_json_event_per_line(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str
) -> None:
    await farm.add_agent("docker-agent", DockerBuilder(docker_binary), native=["linux/amd64"])
    repo = f"{registry.address}/{unique_repo}"
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{repo}:v1", "--progress", "rawjson",
        "--build-arg", f"BASE={base_image}", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert any("log" in e and "RUN echo" in e["log"]["line"] for e in events)
    states = [e["job"]["state"] for e in events if "job" in e]
    assert "JOB_STATE_PUSHED" in states
    assert events[-1]["build"]["index_digest"] == result.stdout.strip()


async def test_annotations_land_on_the_index_and_its_entries(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str
) -> None:
    await farm.add_agent("buildah-agent", BuildahBuilder(), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    description = "org.opencontainers.image.description"
    result = await farm.cli(
        "build", "--platform", "linux/amd64,linux/arm64", "-t", f"{repo}:v1",
        "--build-arg", f"BASE={base_image}",
        "--annotation", f"index:{description}=built by the farm",
        "--annotation", "manifest-descriptor[linux/arm64]:org.example.arch=arm",
        str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    index = skopeo_raw(f"{repo}:v1")  # read by skopeo, not by our own client
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert index["annotations"] == {description: "built by the farm"}
    by_arch = {m["platform"]["architecture"]: m.get("annotations") for m in image_entries(index)}
    assert by_arch == {"amd64": None, "arm64": {"org.example.arch": "arm"}}
    refused = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{repo}:v2",
        "--annotation", f"{description}=on the manifests", str(EXAMPLE),
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "manifest annotations are not supported" in refused.stderr


async def test_a_cache_export_a_docker_agent_cannot_do_is_refused_before_building(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str
) -> None:
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"])
    repo = f"{registry.address}/{unique_repo}"
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", f"{repo}:v1",
        "--build-arg", f"BASE={base_image}",
        "--cache-to", f"type=registry,ref={repo}-cache", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "docker agents export only type=inline caches (agent docker-1" in result.stderr
    builds = await farm.cli("builds", "--json")
    assert json.loads(builds.stdout) == []  # refused: nothing was queued or built


async def test_staging_tags_are_removed_once_published_and_the_index_stays_whole(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str
) -> None:
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    result = await farm.cli(
        "build", "--platform", "linux/amd64,linux/arm64", "-t", f"{repo}:v1",
        "--build-arg", f"BASE={base_image}", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # removed just after the build is reported: no polyarch-<build>-<platform>-<n> left
    await poll_until(lambda: skopeo_tags(repo) == ["v1"], timeout=30,
                     message="staging tags were left")  # fmt: skip
    index = skopeo_raw(f"{repo}:v1")
    for child in index["manifests"]:  # every image the index names is still there
        assert skopeo_raw(f"{repo}@{child['digest']}")["layers"]


async def test_where_deletes_are_off_staging_tags_stay_pointing_at_an_empty_manifest(
    farm: Farm, docker_binary: str, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"])
    with services.running_registry(tmp_path / "no-deletes", delete=False) as strict:
        repo = f"{strict.address}/{unique_repo}"
        result = await farm.cli(
            "build", "--platform", "linux/amd64", "-t", f"{repo}:v1",
            "--build-arg", f"BASE={base_image}", str(EXAMPLE),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr  # the build succeeds all the same

        def staging_emptied() -> bool:
            staging = [t for t in skopeo_tags(repo) if t.startswith("polyarch-")]
            return len(staging) == 1 and skopeo_raw(f"{repo}:{staging[0]}")["layers"] == []

        await poll_until(staging_emptied, timeout=30, message="the staging tag was not emptied")
        assert skopeo_raw(f"{repo}:v1")["manifests"]  # the index is intact


async def test_an_image_output_without_push_verifies_every_platform_and_tags_nothing(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    metadata = tmp_path / "metadata.json"
    result = await farm.cli(
        "build", "--platform", "linux/amd64,linux/arm64", "-t", f"{repo}:pr-7",
        "--output", "type=image,push=false", "--metadata-file", str(metadata),
        "--build-arg", f"BASE={base_image}", str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no tag published (--output)" in result.stderr
    platforms = json.loads(metadata.read_text())["polyarch.platforms"]
    assert sorted(platforms) == ["linux/amd64", "linux/arm64"]
    for platform, record in platforms.items():  # each image was built, pushed by digest
        config = skopeo_raw(f"{repo}@{record['digest']}")["config"]
        assert config["digest"].startswith("sha256:"), platform
    await poll_until(lambda: skopeo_tags(repo) == [], timeout=30,
                     message="an unpublished build left a tag")  # fmt: skip


async def test_a_tag_without_a_tag_part_is_pushed_as_latest(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str
) -> None:
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"])
    repo = f"{registry.address}/{unique_repo}"
    result = await farm.cli(
        "build", "--platform", "linux/amd64", "-t", repo, "--build-arg", f"BASE={base_image}",
        str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert skopeo_raw(f"{repo}:latest")["manifests"]
    await poll_until(lambda: skopeo_tags(repo) == ["latest"], timeout=30,
                     message="the staging tag was left")  # fmt: skip


async def test_tags_in_several_repositories_and_registries_each_hold_the_whole_index(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    """As docker/metadata-action gives them: the index is pushed where the agents pushed,
    then copied by digest: blobs mounted within one registry, streamed to another."""
    await farm.add_agent("docker-1", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    with services.running_registry(tmp_path / "second") as second:
        first_repo = f"{registry.address}/{unique_repo}"
        mirror_repo = f"{registry.address}/{unique_repo}-mirror"
        other_repo = f"{second.address}/elsewhere/app"
        result = await farm.cli(
            "build", "--platform", "linux/amd64,linux/arm64", "-t", f"{first_repo}:v1",
            "-t", f"{mirror_repo}:v1", "-t", f"{mirror_repo}:stable", "-t", f"{other_repo}:v1",
            "--build-arg", f"BASE={base_image}", str(EXAMPLE),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        digest = result.stdout.strip().splitlines()[-1]
        first = skopeo_raw(f"{first_repo}:v1")
        for reference in (f"{mirror_repo}:v1", f"{mirror_repo}:stable", f"{other_repo}:v1"):
            assert skopeo_raw(reference) == first, reference  # the same index, byte for byte
            repo = reference.rsplit(":", 1)[0]
            assert skopeo_raw(f"{repo}@{digest}") == first
            for child in first["manifests"]:  # every image and blob came along
                image = skopeo_raw(f"{repo}@{child['digest']}")
                assert image["layers"], (reference, child["platform"])
        machine = await asyncio.to_thread(
            docker_run_uname, docker_binary, f"{other_repo}:v1", "linux/arm64"
        )
        assert machine == "aarch64"  # pulled from the second registry and run


async def test_a_mode_max_registry_cache_warms_another_buildah_agent_with_its_own_storage(
    farm: Farm, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    """Two platforms export to one cache ref and neither overwrites the other's (buildx#1044):
    a fresh agent then takes the RUN step of both from the registry."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(TWO_STAGES)
    repo, cache = f"{registry.address}/{unique_repo}", f"{registry.address}/{unique_repo}-cache"
    platforms = ["linux/amd64", "linux/arm64"]
    build = ["build", "--platform", ",".join(platforms), "--build-arg", f"BASE={base_image}"]
    # as `polyarch agent --storage-dir DIR` makes it: its own storage, so its own layer cache
    await farm.add_agent("buildah-a", make_builder("buildah", tmp_path, None, tmp_path / "a"),
                         native=["linux/amd64"], emulated=["linux/arm64"], slots=2)  # fmt: skip
    cache_to = f"type=registry,ref={cache}:buildcache,mode=max"
    first = await farm.cli(*build, "-t", f"{repo}:v1", "--cache-to", cache_to, str(context))
    assert first.returncode == 0, first.stderr
    for platform in platforms:
        log = platform_log(first.stderr, platform)
        assert not run_step_cached("buildah", log), f"{platform}: a fresh storage had it cached"
    assert f"buildah pushes every step's layer to {cache} (as mode=max)" in first.stderr
    assert len(skopeo_tags(cache)) >= 4  # each platform's steps, each by its own cache key
    await farm.stop_agent("buildah-a")
    await farm.add_agent("buildah-b", make_builder("buildah", tmp_path, None, tmp_path / "b"),
                         native=["linux/amd64"], emulated=["linux/arm64"], slots=2)  # fmt: skip
    metadata = tmp_path / "metadata.json"
    second = await farm.cli(*build, "-t", f"{repo}:v2", "--metadata-file", str(metadata),
                            "--cache-from", f"type=registry,ref={cache}:buildcache",
                            str(context))  # fmt: skip
    assert second.returncode == 0, second.stderr
    built = json.loads(metadata.read_text())["polyarch.platforms"]
    for platform in platforms:
        assert built[platform]["agent"] == "buildah-b"
        log = platform_log(second.stderr, platform)
        assert run_step_cached("buildah", log), f"{platform}: the RUN step ran again"
        assert f"Cache pulled from remote {cache}:" in log

"""Builder output parsing, command-line construction and the process helper's streaming/cancel."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from polyarch.agent.builders.base import (
    BuildFailed,
    BuildRequest,
    looks_like_infrastructure_failure,
    push_failure_is_transient,
    push_with_retries,
    resolve_dockerfile,
)
from polyarch.agent.builders.buildah import BuildahBuilder, parse_buildah_failure, read_digest_file
from polyarch.agent.builders.docker import (
    DockerBuilder,
    parse_buildkit_failure,
    parse_client_version,
    parse_push_digest,
)
from polyarch.agent.builders.process import (
    ProcessNotFound,
    ProcessResult,
    run_captured,
    run_streaming,
)
from polyarch.proto.caches import (
    cache_count_refusal,
    cache_mode,
    cache_reference,
    cache_refusal,
    cache_repository,
    cache_type,
)
from polyarch.proto.platforms import parse_platform

# --- Output captured from the real tools on the test machine (Docker 20.10.24, buildah 1.28.2).

BUILDKIT_RUN_FAILED = """\
#4 [2/4] RUN uname -m > /arch
#4 sha256:d97ffaccf202eb47c79f9e61ab998051a0ed5ee35ba4366958b04ad92ecf53f7
#4 DONE 0.2s

#5 [3/4] RUN echo hello && exit 3
#5 sha256:0a9c07c7c110a3b0878fd1fed4783885835c6cdd2e3991f559eaadfa94f0b3af
#5 0.380 hello
#5 ERROR: executor failed running [/bin/sh -c echo hello && exit 3]: exit code: 3
------
 > [3/4] RUN echo hello && exit 3:
------
executor failed running [/bin/sh -c echo hello && exit 3]: exit code: 3
"""

# Newer BuildKit (buildx) words the same failure differently; the shape is what matters.
BUILDKIT_RUN_FAILED_NEWER = """\
#7 [2/3] RUN exit 1
#7 0.105 running
#7 ERROR: process "/bin/sh -c exit 1" did not complete successfully: exit code: 1
------
 > [2/3] RUN exit 1:
------
ERROR: failed to solve: process "/bin/sh -c exit 1" did not complete successfully: exit code: 1
"""

BUILDKIT_NO_DOCKERFILE = """\
#1 [internal] load build definition from Nope
#1 sha256:bf3444385145524487fb6ea9363edb6c801cc9700866d40eae9f05debb8ba377
#1 transferring dockerfile: 2B done
#1 DONE 0.0s
failed to solve with frontend dockerfile.v0: failed to read dockerfile: \
open /var/lib/docker/tmp/buildkit-mount359170662/Nope: no such file or directory
"""

BUILDKIT_PARSE_ERROR = """\
#2 [internal] load .dockerignore
#2 transferring context: 2B done
#2 DONE 0.0s
failed to solve with frontend dockerfile.v0: failed to create LLB definition: \
dockerfile parse error line 2: unknown instruction: BOGUS
"""

BUILDKIT_BASE_NOT_FOUND = """\
#3 [internal] load metadata for 127.0.0.1:5077/nope:latest
#3 sha256:35061ea78140ddbec346576345941e2ce950f7aaa9e3c950b0b3a566a638b627
#3 ERROR: 127.0.0.1:5077/nope:latest: not found
------
 > [internal] load metadata for 127.0.0.1:5077/nope:latest:
------
failed to solve with frontend dockerfile.v0: failed to create LLB definition: \
127.0.0.1:5077/nope:latest: not found
"""

BUILDKIT_QEMU_CRASH = """\
#5 [2/2] RUN sh -c "kill -SEGV $$"
#5 sha256:f9a430b0d1911e1eadd4e8047a5ce842fdf829720c0466f5ad9505b662558931
#5 0.192 qemu: uncaught target signal 11 (Segmentation fault) - core dumped
#5 ERROR: executor failed running [/bin/sh -c sh -c "kill -SEGV $$"]: exit code: 139
"""

DOCKER_PUSH = """\
The push refers to repository [127.0.0.1:5077/t2]
d791a8dbf4df: Preparing
386c59ecb313: Preparing
386c59ecb313: Mounted from base
d791a8dbf4df: Pushed
linux-arm64: digest: sha256:120b18a68425efcb3137de616e396cd97aa58208aff0ddcd92ad100d3dc10ed9 \
size: 734
"""

BUILDAH_RUN_FAILED = """\
STEP 1/4: FROM 127.0.0.1:5077/base:latest
Trying to pull 127.0.0.1:5077/base:latest...
Getting image source signatures
Writing manifest to image destination
Storing signatures
STEP 2/4: RUN uname -m > /arch
--> 51d13911fae
STEP 3/4: RUN echo hello && exit 3
hello
Error: building at STEP "RUN echo hello && exit 3": while running runtime: exit status 3
"""

BUILDAH_QEMU_CRASH = """\
STEP 1/2: FROM 127.0.0.1:5077/base:latest
STEP 2/2: RUN sh -c "kill -SEGV \\$\\$"
qemu: uncaught target signal 11 (Segmentation fault) - core dumped
time="2026-11-28T07:48:08Z" level=error msg="container not running"
time="2026-11-28T07:48:08Z" level=error msg="exit status 1 sending SIGKILL"
container exited on killed
Error: building at STEP "RUN sh -c "kill -SEGV \\$\\$"": while running runtime: exit status 1
"""

BUILDAH_NO_DOCKERFILE = "Error: stat /tmp/pa-scratch/ctx/ctx/Nope: no such file or directory\n"

BUILDAH_UNKNOWN_INSTRUCTION = """\
STEP 1/2: FROM 127.0.0.1:5077/base:latest
STEP 2/2: BOGUS thing
Error: building at STEP "BOGUS ": Build error: Unknown instruction: "BOGUS" \
&imagebuilder.Step{Env:[]string{"PATH=/bin"}, Command:"bogus", Original:"BOGUS thing"}
"""

BUILDAH_BASE_NOT_FOUND = """\
STEP 1/2: FROM 127.0.0.1:5077/nope:latest
Trying to pull 127.0.0.1:5077/nope:latest...
Error: creating build container: initializing source docker://127.0.0.1:5077/nope:latest: \
reading manifest latest in 127.0.0.1:5077/nope: manifest unknown: manifest unknown
"""

BUILDAH_MULTI_STAGE = """\
[1/2] STEP 1/2: FROM 127.0.0.1:5077/base:latest AS build
[1/2] STEP 2/2: RUN echo ok > /x
[2/2] STEP 1/3: FROM 127.0.0.1:5077/base:latest
[2/2] STEP 2/3: RUN false
Error: building at STEP "RUN false": while running runtime: exit status 1
"""


def lines(text: str) -> list[str]:
    return text.splitlines()


# --- BuildKit


def test_buildkit_failed_run_step() -> None:
    failure = parse_buildkit_failure(lines(BUILDKIT_RUN_FAILED))
    assert failure.step == "[3/4] RUN echo hello && exit 3"
    assert "exit code: 3" in failure.message
    assert failure.infrastructure is False


def test_buildkit_newer_wording() -> None:
    failure = parse_buildkit_failure(lines(BUILDKIT_RUN_FAILED_NEWER))
    assert failure.step == "[2/3] RUN exit 1"
    assert failure.message == (
        'process "/bin/sh -c exit 1" did not complete successfully: exit code: 1'
    )
    assert not failure.infrastructure


def test_buildkit_summary_block_is_a_fallback() -> None:
    summary_only = "\n".join(lines(BUILDKIT_RUN_FAILED)[-4:])
    failure = parse_buildkit_failure(lines(summary_only))
    assert failure.step == "[3/4] RUN echo hello && exit 3"


def test_buildkit_missing_dockerfile() -> None:
    failure = parse_buildkit_failure(lines(BUILDKIT_NO_DOCKERFILE), "Nope")
    assert failure.step == "prepare"
    assert failure.message == "Dockerfile 'Nope' not found in the build context"
    assert not failure.infrastructure


def test_buildkit_parse_error() -> None:
    failure = parse_buildkit_failure(lines(BUILDKIT_PARSE_ERROR))
    assert failure.step == "parse Dockerfile"
    assert "unknown instruction: BOGUS" in failure.message


def test_buildkit_base_image_not_found() -> None:
    failure = parse_buildkit_failure(lines(BUILDKIT_BASE_NOT_FOUND))
    assert failure.step == "[internal] load metadata for 127.0.0.1:5077/nope:latest"
    assert failure.message == "127.0.0.1:5077/nope:latest: not found"
    assert not failure.infrastructure


def test_buildkit_emulator_crash_is_infrastructure() -> None:
    failure = parse_buildkit_failure(lines(BUILDKIT_QEMU_CRASH))
    assert failure.step == '[2/2] RUN sh -c "kill -SEGV $$"'
    assert failure.infrastructure is True


def test_buildkit_unrecognised_output_keeps_last_line() -> None:
    failure = parse_buildkit_failure(["something odd", "", "the real reason"])
    assert (failure.step, failure.message) == ("build", "the real reason")
    assert parse_buildkit_failure([]).message


def test_docker_push_digest() -> None:
    digest = "sha256:120b18a68425efcb3137de616e396cd97aa58208aff0ddcd92ad100d3dc10ed9"
    assert parse_push_digest(lines(DOCKER_PUSH)) == (digest, 734)
    assert parse_push_digest(["denied: requested access to the resource is denied"]) is None


def test_docker_client_version() -> None:
    assert parse_client_version("20.10.24+dfsg1 20.10.24+dfsg1\n") == (
        20,
        "20.10.24+dfsg1",
        "20.10.24+dfsg1",
    )
    assert parse_client_version("28.2.2 ") == (28, "28.2.2", "")
    assert parse_client_version("") == (0, "", "")


# --- buildah


def test_buildah_failed_run_step() -> None:
    failure = parse_buildah_failure(lines(BUILDAH_RUN_FAILED))
    assert failure.step == "[3/4] RUN echo hello && exit 3"
    assert failure.message == "while running runtime: exit status 3"
    assert not failure.infrastructure


def test_buildah_quotes_inside_the_instruction() -> None:
    failure = parse_buildah_failure(lines(BUILDAH_QEMU_CRASH))
    assert failure.step == '[2/2] RUN sh -c "kill -SEGV \\$\\$"'
    assert failure.message == "while running runtime: exit status 1"
    assert failure.infrastructure is True


def test_buildah_missing_dockerfile() -> None:
    failure = parse_buildah_failure(lines(BUILDAH_NO_DOCKERFILE), "Nope")
    assert (failure.step, failure.infrastructure) == ("prepare", False)
    assert "'Nope' not found" in failure.message


def test_buildah_unknown_instruction_drops_struct_dump() -> None:
    failure = parse_buildah_failure(lines(BUILDAH_UNKNOWN_INSTRUCTION))
    assert failure.step == "[2/2] BOGUS thing"
    assert failure.message == 'Build error: Unknown instruction: "BOGUS"'


def test_buildah_base_image_not_found_blames_from_step() -> None:
    failure = parse_buildah_failure(lines(BUILDAH_BASE_NOT_FOUND))
    assert failure.step == "[1/2] FROM 127.0.0.1:5077/nope:latest"
    assert "manifest unknown" in failure.message


def test_buildah_multi_stage_names_the_stage() -> None:
    failure = parse_buildah_failure(lines(BUILDAH_MULTI_STAGE))
    assert failure.step == "[stage 2/2 2/3] RUN false"


def test_buildah_digest_file(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_text("sha256:" + "ab" * 32)
    bad = tmp_path / "bad"
    bad.write_text("not a digest")
    assert read_digest_file(good) == "sha256:" + "ab" * 32
    assert read_digest_file(bad) is None
    assert read_digest_file(tmp_path / "absent") is None


def test_infrastructure_patterns() -> None:
    assert looks_like_infrastructure_failure(["exec /bin/sh: exec format error"])
    assert looks_like_infrastructure_failure(["write /x: no space left on device"])
    assert not looks_like_infrastructure_failure(["exit code: 1", "hello"])
    # containers-storage races between slots (seen with buildah 1.28 on this machine)
    assert looks_like_infrastructure_failure([
        'Error: creating build container: locating pulled image "127.0.0.1:5099/b/busybox:1" '
        'name in containers storage: 127.0.0.1:5099/b/busybox:1: image not known'
    ])  # fmt: skip
    assert looks_like_infrastructure_failure([
        "Error: checking if cached image exists from a previous build: "
        "getting top layer info: layer not known"
    ])  # fmt: skip
    failed = parse_buildah_failure([
        "STEP 1/3: FROM 127.0.0.1:5099/b/busybox:1",
        'Error: creating build container: locating pulled image "127.0.0.1:5099/b/busybox:1" '
        "name in containers storage: 127.0.0.1:5099/b/busybox:1: image not known",
    ])  # fmt: skip
    assert failed.infrastructure and failed.step == "[1/3] FROM 127.0.0.1:5099/b/busybox:1"


def test_transient_push_failures() -> None:
    assert push_failure_is_transient(["received unexpected HTTP status: 500 Internal Server Error"])
    assert push_failure_is_transient(
        ["read tcp 127.0.0.1:1->127.0.0.1:2: connection reset by peer"]
    )
    assert push_failure_is_transient(["manifest blob unknown: blob unknown to registry"])
    assert not push_failure_is_transient(["unauthorized: authentication required"])
    assert not push_failure_is_transient(["denied: requested access to the resource is denied"])


async def test_push_retries_only_transient_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("polyarch.agent.builders.base.PUSH_RETRY_BASE_SECONDS", 0.001)
    outcomes = [
        ProcessResult(
            ("push",), 1, ("received unexpected HTTP status: 500 Internal Server Error",)
        ),
        ProcessResult(("push",), 0, ("digest: sha256:ab size: 1",)),
    ]
    calls: list[int] = []

    async def push() -> ProcessResult:
        calls.append(1)
        return outcomes[len(calls) - 1]

    notes: list[str] = []
    assert (await push_with_retries(push, notes.append)).ok
    assert len(calls) == 2 and "push attempt 1 failed" in notes[0]

    denied = ProcessResult(("push",), 1, ("unauthorized: authentication required",))
    calls.clear()

    async def refused() -> ProcessResult:
        calls.append(1)
        return denied

    assert await push_with_retries(refused, notes.append) is denied
    assert len(calls) == 1

    flaky = ProcessResult(("push",), 1, ("502 Bad Gateway",))

    async def always_flaky() -> ProcessResult:
        calls.append(1)
        return flaky

    calls.clear()
    assert not (await push_with_retries(always_flaky, notes.append)).ok
    assert len(calls) == 3


# --- command lines


def make_request(tmp_path: Path, **overrides: object) -> BuildRequest:
    (tmp_path / "docker").mkdir(exist_ok=True)
    (tmp_path / "docker" / "Dockerfile.app").write_text("FROM scratch\n")
    fields: dict[str, object] = {
        "context_dir": tmp_path,
        "dockerfile": "docker/Dockerfile.app",
        "platform": parse_platform("linux/arm/v7"),
        "image": "127.0.0.1:5000/team/app:job-1",
        "build_args": {"VERSION": "1.2", "A": "x y"},
        "target": "runtime",
        "labels": {"org.opencontainers.image.revision": "abc"},
    }
    fields.update(overrides)
    return BuildRequest(**fields)  # type: ignore[arg-type]


def test_docker_build_command(tmp_path: Path) -> None:
    request = make_request(
        tmp_path, cache_from=["type=registry,ref=reg/cache:app"], cache_to=["type=inline"]
    )
    argv, notes = DockerBuilder("/usr/bin/docker").build_command(request, "/abs/Dockerfile")
    assert argv == [
        "/usr/bin/docker", "build", "--progress=plain",
        "--platform", "linux/arm/v7", "-f", "/abs/Dockerfile",
        "-t", "127.0.0.1:5000/team/app:job-1",
        "--build-arg", "A=x y", "--build-arg", "BUILDKIT_INLINE_CACHE=1",
        "--build-arg", "VERSION=1.2",
        "--target", "runtime",
        "--label", "org.opencontainers.image.revision=abc",
        "--cache-from", "reg/cache:app",
        str(tmp_path),
    ]  # fmt: skip
    assert notes == []


def test_docker_build_command_notes_unsupported_cache_export(tmp_path: Path) -> None:
    request = make_request(tmp_path, target="", cache_to=["type=registry,ref=reg/c:x"])
    argv, notes = DockerBuilder().build_command(request, "/abs/Dockerfile")
    assert "--target" not in argv
    assert "--cache-to" not in argv
    assert notes and "cannot export cache" in notes[0]
    inline_max = make_request(tmp_path, cache_to=["type=inline,mode=max"])
    argv, notes = DockerBuilder().build_command(inline_max, "/abs/Dockerfile")
    assert "BUILDKIT_INLINE_CACHE=1" not in argv  # refused at submit; skipped by an agent
    assert notes == ["docker build without buildx cannot export cache 'type=inline,mode=max'; "
                     "skipped"]  # fmt: skip


def test_buildah_takes_cache_repositories_and_exports_every_step_in_any_mode(
    tmp_path: Path,
) -> None:
    for mode in ("", ",mode=min", ",mode=max"):
        request = make_request(
            tmp_path, cache_from=["type=registry,ref=reg.lan/team/cache:buildcache"],
            cache_to=[f"type=registry,ref=reg.lan/team/cache:buildcache{mode}"],
        )  # fmt: skip
        argv, notes = BuildahBuilder().build_command(request, "/abs/Dockerfile")
        at = argv.index("--cache-from")
        # the tag goes: buildah refuses it and tags each cache image by its content key
        assert argv[at : at + 4] == [
            "--cache-from", "reg.lan/team/cache", "--cache-to", "reg.lan/team/cache",
        ]  # fmt: skip
        assert notes == [
            f"cache 'type=registry,ref=reg.lan/team/cache:buildcache{mode}': buildah pushes "
            "every step's layer to reg.lan/team/cache (as mode=max), tagged by its cache key"
        ]
    docker_hub = make_request(tmp_path, cache_from=["team/cache:1"])
    argv, _ = BuildahBuilder().build_command(docker_hub, "/abs/Dockerfile")
    assert "docker.io/team/cache" in argv  # normalised as docker (and buildx) would


def test_buildah_commands(tmp_path: Path) -> None:
    request = make_request(tmp_path, insecure_registry=True, cache_from=["reg.lan/cache"])
    builder = BuildahBuilder(storage_driver="vfs")
    argv, notes = builder.build_command(request, "/abs/Dockerfile")
    assert argv == [
        "buildah", "--storage-driver", "vfs", "build", "--platform", "linux/arm/v7",
        "-f", "/abs/Dockerfile", "-t", "127.0.0.1:5000/team/app:job-1",
        "--layers", "--force-rm", "--format", "oci", "--tls-verify=false",
        "--build-arg", "A=x y", "--build-arg", "VERSION=1.2",
        "--target", "runtime",
        "--label", "org.opencontainers.image.revision=abc",
        "--cache-from", "reg.lan/cache",
        str(tmp_path),
    ]  # fmt: skip
    assert notes == []
    push = builder.push_command(request, Path("/tmp/d"))
    assert push == [
        "buildah", "--storage-driver", "vfs", "push", "--digestfile", "/tmp/d",
        "--format", "oci", "--tls-verify=false",
        "127.0.0.1:5000/team/app:job-1", "docker://127.0.0.1:5000/team/app:job-1",
    ]  # fmt: skip


def test_no_cache_and_pull_as_each_builder_spells_them(tmp_path: Path) -> None:
    request = make_request(tmp_path, no_cache=True, pull=True, cache_to=[], cache_from=[])
    docker, _ = DockerBuilder().build_command(request, "/abs/Dockerfile")
    buildah, _ = BuildahBuilder().build_command(request, "/abs/Dockerfile")
    assert "--no-cache" in docker and "--pull" in docker
    # buildah's bare --pull means "if newer or missing"; buildx's --pull means always
    assert "--no-cache" in buildah and "--pull=always" in buildah
    plain = make_request(tmp_path, cache_to=[], cache_from=[])
    for argv in (DockerBuilder().build_command(plain, "/D")[0],
                 BuildahBuilder().build_command(plain, "/D")[0]):  # fmt: skip
        assert not {"--no-cache", "--pull", "--pull=always"} & set(argv)


def test_buildah_verifies_tls_by_default(tmp_path: Path) -> None:
    request = make_request(tmp_path, cache_to=["type=local,dest=/x"])
    argv, notes = BuildahBuilder().build_command(request, "/abs/Dockerfile")
    assert "--tls-verify=false" not in argv
    assert "--tls-verify=false" not in BuildahBuilder().push_command(request, Path("/d"))
    assert notes and "type=local" in notes[0]


def test_cache_specs() -> None:
    assert cache_reference("reg/cache:x") == "reg/cache:x"
    assert cache_reference("type=registry,ref=reg/cache:x,mode=max") == "reg/cache:x"
    assert cache_type("type=inline") == "inline"
    assert cache_type("reg/cache") == "registry"
    assert cache_mode("type=registry,ref=reg/cache") == "min"  # buildx's default
    assert cache_mode("type=registry,ref=reg/cache,mode=max") == "max"
    assert cache_repository("type=registry,ref=reg.lan:5000/a/cache:tag") == "reg.lan:5000/a/cache"
    assert cache_repository("app-cache") == "docker.io/library/app-cache"


@pytest.mark.parametrize(
    ("builder", "direction", "spec", "refusal"),
    [
        ("docker", "from", "type=registry,ref=reg/app:1", ""),
        ("docker", "from", "reg/app:1", ""),
        ("docker", "to", "type=inline", ""),
        ("docker", "to", "type=inline,mode=min", ""),
        ("docker", "to", "type=inline,mode=max",
         "docker agents export only inline caches, which hold the final image's layers "
         "(mode=min); mode=max needs a registry cache exporter, which `docker build` without "
         "buildx lacks"),
        ("docker", "to", "type=registry,ref=reg/c,mode=max",
         "docker agents export only type=inline caches"),
        ("docker", "to", "type=local,dest=/x", "docker agents export only type=inline caches"),
        ("buildah", "from", "type=registry,ref=reg/c:buildcache", ""),
        ("buildah", "to", "type=registry,ref=reg/c", ""),
        ("buildah", "to", "type=registry,ref=reg/c:buildcache,mode=min", ""),
        ("buildah", "to", "type=registry,ref=reg/c,mode=max", ""),
        ("buildah", "to", "type=inline", "buildah agents export only type=registry caches"),
        ("buildah", "from", "type=gha", "buildah agents import only type=registry caches"),
        ("buildah", "to", "type=registry,mode=max", "a registry cache needs ref=<repository>"),
        ("buildah", "to", f"type=registry,ref=reg/c@sha256:{'0' * 64}",
         f"buildah agents need a cache repository: reg/c@sha256:{'0' * 64} names a digest: "
         "give a repository"),
        ("buildah", "to", "type=registry,ref=reg/c,mode=all",
         "mode=all is not a cache mode: use mode=min or mode=max"),
        ("docker", "to", "type=inline,mode=fast",
         "mode=fast is not a cache mode: use mode=min or mode=max"),
        ("kaniko", "to", "type=registry,ref=reg/c", ""),  # its agent says what it does
    ],
)  # fmt: skip
def test_which_cache_specs_each_builder_refuses(
    builder: str, direction: str, spec: str, refusal: str
) -> None:
    assert cache_refusal(builder, direction, spec) == refusal


def test_a_buildah_agent_takes_one_cache_spec_per_direction() -> None:
    two = ["type=registry,ref=reg/a", "type=registry,ref=reg/b"]
    assert cache_count_refusal("buildah", "from", two) == (
        "buildah agents take one --cache-from (buildah keeps only the last it is given)"
    )
    assert cache_count_refusal("buildah", "to", two[:1]) == ""
    assert cache_count_refusal("docker", "from", two) == ""  # docker build takes several


def test_resolve_dockerfile(tmp_path: Path) -> None:
    assert resolve_dockerfile(make_request(tmp_path)) == tmp_path / "docker/Dockerfile.app"
    for bad, words in [
        ("Missing", "'Missing' not found in the build context"),
        ("../outside", "must be relative and inside the context"),
        ("/etc/passwd", "must be relative and inside the context"),
    ]:
        with pytest.raises(BuildFailed) as caught:
            resolve_dockerfile(make_request(tmp_path, dockerfile=bad))
        assert caught.value.step == "prepare"
        assert words in caught.value.message
        assert not caught.value.infrastructure


def test_build_failed_fields() -> None:
    failure = BuildFailed("push", "denied", True)
    assert (failure.step, failure.message, failure.infrastructure) == ("push", "denied", True)
    assert str(failure) == "push: denied"


# --- process helper


async def test_lines_stream_before_the_process_ends() -> None:
    seen: list[tuple[float, str]] = []
    started = time.monotonic()
    script = "echo first; sleep 0.5; printf 'last-no-newline'"
    result = await run_streaming(
        ["sh", "-c", script], lambda line: seen.append((time.monotonic(), line))
    )
    ended = time.monotonic()
    assert result.ok
    assert [line for _, line in seen] == ["first", "last-no-newline"]
    assert seen[0][0] - started < ended - started - 0.3  # "first" arrived well before the end


async def test_stderr_is_merged_and_long_lines_survive() -> None:
    script = "import sys; print('err', file=sys.stderr, flush=True); print('x' * 200_000); exit(4)"
    result = await run_captured([sys.executable, "-c", script])
    assert result.returncode == 4
    assert result.lines == ("err", "x" * 200_000)


async def test_missing_program() -> None:
    with pytest.raises(ProcessNotFound):
        await run_captured(["/nonexistent/polyarch-tool"])


async def test_cancel_kills_the_whole_process_group() -> None:
    pids: list[int] = []
    lines_seen: list[str] = []
    # The child ignores SIGTERM, so only the SIGKILL after the grace period stops it.
    script = "trap '' TERM; sleep 60 & echo child $!; wait"
    task = asyncio.create_task(
        run_streaming(["sh", "-c", script], lines_seen.append, on_start=pids.append)
    )
    deadline = time.monotonic() + 5
    while not any(line.startswith("child ") for line in lines_seen):
        assert time.monotonic() < deadline, "the script never started its child"
        await asyncio.sleep(0.02)
    child = int(lines_seen[0].split()[1])
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - cancelled_at < 10
    for pid in (pids[0], child):
        while not process_gone(pid):  # a killed orphan may stay a zombie until init reaps it
            assert time.monotonic() < cancelled_at + 10, f"pid {pid} survived the cancel"
            await asyncio.sleep(0.02)


def process_gone(pid: int) -> bool:
    """True once pid no longer runs (absent, or a zombie waiting to be reaped)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return status.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_docker_notes_insecure_remote_registry(tmp_path: Path) -> None:
    remote = make_request(tmp_path, image="registry.lan:5000/app:job-1", insecure_registry=True)
    _, notes = DockerBuilder().build_command(remote, "/abs/Dockerfile")
    assert any("insecure-registries" in note for note in notes)
    local = make_request(tmp_path, insecure_registry=True)
    assert DockerBuilder().build_command(local, "/abs/Dockerfile")[1] == []

"""The polyarch CLI against a fake coordinator: exit codes, progress, digest, metadata, JSON."""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import types
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from polyarch.client import api, cli, render
from polyarch.coordinator.config import ConfigError, config_from
from polyarch.proto.v1 import (
    build_pb2,
    build_pb2_grpc,
    common_pb2,
    fleet_pb2,
    fleet_pb2_grpc,
)

INDEX = "sha256:" + "1" * 64
AMD64 = "sha256:" + "a" * 64
ARM64 = "sha256:" + "b" * 64
TAGS = ["registry.example:5000/team/app:1.0", "registry.example:5000/team/app:latest"]


def job(platform: str, state: int, **fields: Any) -> build_pb2.Job:
    return build_pb2.Job(id=f"j-{platform}", platform=platform, state=state, **fields)  # type: ignore[arg-type]


@dataclass
class FakeCoordinator(build_pb2_grpc.BuildServiceServicer, fleet_pb2_grpc.FleetServiceServicer):
    """Scripted BuildService and FleetService; `fail_arm64` makes linux/arm64 fail."""

    fail_arm64: bool = False
    drop_watches: int = 0  # this many watches break off (UNAVAILABLE) after the snapshot
    contexts: dict[str, bytes] = field(default_factory=dict)
    submitted: list[build_pb2.SubmitBuildRequest] = field(default_factory=list)
    builds: dict[str, build_pb2.Build] = field(default_factory=dict)
    max_context_bytes: int = 0  # 0: says no limit, as an older coordinator would

    def StatContext(self, request: Any, context: Any) -> build_pb2.StatContextResponse:
        data = self.contexts.get(request.digest)
        return build_pb2.StatContextResponse(
            present=data is not None, size=len(data or b""), max_bytes=self.max_context_bytes
        )

    def UploadContext(self, request_iterator: Any, context: Any) -> Any:
        chunks = list(request_iterator)
        data = b"".join(c.data for c in chunks)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest != chunks[0].digest or len(data) != chunks[0].size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "context does not match its digest")
        if any(c.digest for c in chunks[1:]):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "digest in a later chunk")
        self.contexts[digest] = data
        return build_pb2.UploadContextResponse(digest=digest, size=len(data))

    def SubmitBuild(self, request: Any, context: Any) -> build_pb2.SubmitBuildResponse:
        if request.context_digest not in self.contexts:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unknown context")
        self.submitted.append(request)
        build = build_pb2.Build(
            id=f"b-{len(self.submitted)}",
            state=common_pb2.BUILD_STATE_QUEUED,
            tags=request.tags,
            jobs=[job(p, common_pb2.JOB_STATE_QUEUED, attempt=1) for p in request.platforms],
        )
        self.builds[build.id] = build
        return build_pb2.SubmitBuildResponse(build=build)

    def WatchBuild(self, request: Any, context: Any) -> Iterator[build_pb2.BuildEvent]:
        build = self.builds[request.build_id]
        yield build_pb2.BuildEvent(build=build)
        if self.drop_watches:
            self.drop_watches -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer")
        native = common_pb2.BUILD_MODE_NATIVE
        amd = job("linux/amd64", common_pb2.JOB_STATE_ASSIGNED, agent="agent-a", mode=native)
        arm = job("linux/arm64", common_pb2.JOB_STATE_ASSIGNED, agent="agent-b", mode=native)
        for current in (amd, arm):
            current.attempt = 1
            yield build_pb2.BuildEvent(job=current)
            yield build_pb2.BuildEvent(job=current)  # a repeat renders nothing new
        yield build_pb2.BuildEvent(
            log=build_pb2.LogLine(job_id=arm.id, platform=arm.platform, line="#5 [2/3] RUN make\n")
        )
        amd.state, amd.digest = common_pb2.JOB_STATE_PUSHED, AMD64
        yield build_pb2.BuildEvent(job=amd)
        if self.fail_arm64:
            arm.state = common_pb2.JOB_STATE_FAILED
            arm.failed_step = "[2/3] RUN exit 1"
            arm.error = "process exited with code 1"
            final = build_pb2.Build(
                id=build.id, state=common_pb2.BUILD_STATE_FAILED, tags=build.tags,
                jobs=[amd, arm], error="linux/arm64 failed",
            )  # fmt: skip
        else:
            arm.state, arm.digest = common_pb2.JOB_STATE_PUSHED, ARM64
            yield build_pb2.BuildEvent(job=arm)
            assembling = build_pb2.Build(
                id=build.id,
                state=common_pb2.BUILD_STATE_ASSEMBLING,
                tags=build.tags,
                jobs=[amd, arm],
            )
            yield build_pb2.BuildEvent(build=assembling)
            final = build_pb2.Build(
                id=build.id, state=common_pb2.BUILD_STATE_SUCCEEDED, tags=build.tags,
                jobs=[amd, arm], index_digest=INDEX,
                index_media_type="application/vnd.oci.image.index.v1+json",
            )  # fmt: skip
        if self.fail_arm64:
            yield build_pb2.BuildEvent(job=arm)
        self.builds[build.id] = final
        yield build_pb2.BuildEvent(build=final)

    def GetBuild(self, request: Any, context: Any) -> build_pb2.Build:
        if request.build_id not in self.builds:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no build {request.build_id}")
        return self.builds[request.build_id]

    def CancelBuild(self, request: Any, context: Any) -> build_pb2.Build:
        build = self.GetBuild(request, context)
        build.state = common_pb2.BUILD_STATE_CANCELLED
        return build

    def ListBuilds(self, request: Any, context: Any) -> build_pb2.ListBuildsResponse:
        return build_pb2.ListBuildsResponse(builds=list(self.builds.values())[: request.limit])

    def ListAgents(self, request: Any, context: Any) -> fleet_pb2.ListAgentsResponse:
        running = [fleet_pb2.AgentJob(build_id="b-1", job_id="j-1", platform="linux/arm64")]
        return fleet_pb2.ListAgentsResponse(
            agents=[
                fleet_pb2.Agent(
                    name="agent-a", state=fleet_pb2.AGENT_STATE_READY, builder="docker",
                    native_platforms=["linux/amd64"], emulated_platforms=["linux/arm/v7"],
                    slots=2, version="0.1.0",
                ),
                fleet_pb2.Agent(
                    name="agent-b", state=fleet_pb2.AGENT_STATE_DRAINING, builder="buildah",
                    native_platforms=["linux/arm64"], slots=1, running=running,
                ),
            ]
        )  # fmt: skip


@pytest.fixture(autouse=True)
def plaintext(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake coordinator speaks plaintext, as a `--insecure` coordinator does."""
    monkeypatch.setenv("POLYARCH_INSECURE", "1")
    for name in ("POLYARCH_TOKEN", "POLYARCH_TOKEN_FILE", "POLYARCH_CA_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def hash_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The context's file hashes are cached in the test's folder, not the user's."""
    monkeypatch.setenv("POLYARCH_CACHE_DIR", str(tmp_path / "polyarch-cache"))


@pytest.fixture
def coordinator() -> Iterator[tuple[str, FakeCoordinator]]:
    fake = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    build_pb2_grpc.add_BuildServiceServicer_to_server(fake, server)
    fleet_pb2_grpc.add_FleetServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", fake
    finally:
        server.stop(None)


@pytest.fixture
def context_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    root.mkdir()
    (root / "Dockerfile").write_text("FROM scratch\n")
    (root / "app.txt").write_text("hello\n")
    return root


def build_argv(address: str, context_dir: Path, *extra: str) -> list[str]:
    return [
        "build", "--coordinator", address, "--platform", "linux/amd64,linux/arm64/v8",
        "-t", TAGS[0], "-t", TAGS[1], *extra, str(context_dir),
    ]  # fmt: skip


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_successful_build_renders_progress_and_prints_the_digest_last(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = coordinator
    metadata = tmp_path / "meta.json"
    iidfile = tmp_path / "iid"
    argv = build_argv(address, context_dir, "--metadata-file", str(metadata), "--build-arg", "V=1",
                      "--iidfile", str(iidfile), "--push")  # fmt: skip
    assert cli.main(argv) == 0
    assert iidfile.read_text() == INDEX  # as buildx: the index digest, no newline
    out, err = capsys.readouterr()
    assert out.splitlines() == [INDEX]
    assert "bytes) uploaded" in err
    assert "[linux/arm64] queued" in err
    assert err.count("[linux/arm64] assigned to agent-b (native)") == 1
    assert "[linux/arm64] #5 [2/3] RUN make" in err
    assert f"[linux/amd64] pushed {AMD64}" in err
    request = fake.submitted[0]
    assert list(request.platforms) == ["linux/amd64", "linux/arm64"]
    assert list(request.tags) == TAGS
    assert request.dockerfile == "Dockerfile"
    assert dict(request.build_args) == {"V": "1"}
    assert request.idempotency_key
    assert request.emulation == common_pb2.EMULATION_POLICY_FALLBACK

    meta = json.loads(metadata.read_text())
    assert set(meta) == {
        "containerimage.digest",
        "containerimage.descriptor",
        "image.name",
        "buildx.build.ref",
        "polyarch.build.id",
        "polyarch.platforms",
    }
    assert meta["buildx.build.ref"] == f"polyarch/{address}/b-1"
    assert not request.no_cache and not request.pull
    assert meta["containerimage.digest"] == INDEX
    assert meta["containerimage.descriptor"]["digest"] == INDEX
    assert meta["containerimage.descriptor"]["mediaType"].endswith("index.v1+json")
    assert meta["image.name"] == ",".join(TAGS)
    assert meta["polyarch.build.id"] == "b-1"
    assert meta["polyarch.platforms"]["linux/arm64"] == {
        "digest": ARM64,
        "agent": "agent-b",
        "mode": "native",
    }


def test_no_cache_and_pull_reach_the_request_and_rawjson_prints_only_json_events(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = coordinator
    argv = build_argv(address, context_dir, "--no-cache", "--pull", "--progress", "rawjson")
    assert cli.main(argv) == 0
    request = fake.submitted[0]
    assert request.no_cache and request.pull
    out, err = capsys.readouterr()
    assert out.splitlines() == [INDEX]
    events = [json.loads(line) for line in err.splitlines()]  # every line is one JSON event
    assert {next(iter(e)) for e in events} == {"build", "job", "log"}
    logs = [e["log"] for e in events if "log" in e]
    assert {"job_id", "platform", "line"} <= set(logs[0])
    assert events[-1]["build"]["state"] == "BUILD_STATE_SUCCEEDED"


def test_an_image_output_without_push_builds_and_publishes_nothing(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = coordinator
    assert cli.main(build_argv(address, context_dir, "--output", "type=image,push=false")) == 0
    assert fake.submitted[0].no_publish
    assert "no tag published (--output)" in capsys.readouterr().err
    assert cli.main(build_argv(address, context_dir, "--output", "type=oci")) == 2
    assert "type=oci needs dest=FILE" in capsys.readouterr().err
    assert len(fake.submitted) == 1  # the refused one never reached the coordinator


def test_a_push_needs_a_tag_and_an_unpushed_build_does_not(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = coordinator
    untagged = ["build", "--coordinator", address, "--platform", "linux/amd64"]
    assert cli.main([*untagged, str(context_dir)]) == 2
    assert "no tag given: pushing needs -t registry/repository:tag" in capsys.readouterr().err
    assert not fake.submitted
    assert cli.main([*untagged, "--output", "type=image,push=false", str(context_dir)]) == 0
    assert fake.submitted[0].no_publish and not fake.submitted[0].tags


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--ssh", "default"], "--ssh: not supported: agents hold no SSH agent"),
        (["--provenance=mode=full"], "--provenance: provenance 'mode=full': expected false"),
        (["--sbom=true"], "--sbom: not supported: no SBOM is made on the farm"),
        (["--network", "host"], "--network: not supported: builds use the agent's default"),
        (["--build-context", "x=../x"], "--build-context: not supported: named build contexts"),
    ],
)
def test_buildx_flags_the_farm_cannot_honour_are_refused_with_why(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    says: str,
) -> None:
    address, fake = coordinator
    assert cli.main(build_argv(address, context_dir, *flags)) == 2
    assert says in capsys.readouterr().err
    assert not fake.submitted


def test_buildx_flags_asking_for_what_the_farm_does_anyway_are_accepted(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = coordinator
    harmless = ["--provenance=false", "--sbom=false", "--network=default", "--builder", "b1", "-q"]
    assert cli.main(build_argv(address, context_dir, *harmless)) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [INDEX]
    assert err.strip() == "polyarch: warning: --builder ignored: the farm is the builder"
    assert len(fake.submitted) == 1


@pytest.mark.parametrize(
    ("flags", "mode"),
    [([], "min"), (["--provenance=false"], ""), (["--provenance", "mode=max"], "max"),
     (["--provenance=true"], "min"), (["--provenance=mode=min"], "min")],
)  # fmt: skip
def test_provenance_flag_reaches_the_submit_as_buildx_reads_it(
    coordinator: tuple[str, FakeCoordinator], context_dir: Path, flags: list[str], mode: str
) -> None:
    address, fake = coordinator
    assert cli.main(build_argv(address, context_dir, "-q", *flags)) == 0
    assert fake.submitted[0].provenance == mode


def test_second_build_skips_the_upload_and_uses_a_new_idempotency_key(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = coordinator
    assert cli.main(build_argv(address, context_dir)) == 0
    assert cli.main(build_argv(address, context_dir, "--idempotency-key", "ci-42")) == 0
    err = capsys.readouterr().err
    assert "already on coordinator" in err
    keys = [r.idempotency_key for r in fake.submitted]
    assert keys[1] == "ci-42" and keys[0] != "ci-42"


def test_failed_platform_exits_1_naming_platform_step_and_agent(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = coordinator
    fake.fail_arm64 = True
    metadata = tmp_path / "meta.json"
    assert cli.main(build_argv(address, context_dir, "--metadata-file", str(metadata))) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert not metadata.exists()
    assert '[linux/arm64] FAILED at step "[2/3] RUN exit 1" on agent-b' in err
    summary = err[err.index("build b-1 failed") :]
    assert 'linux/arm64: FAILED at step "[2/3] RUN exit 1" on agent-b (native)' in summary
    assert f"linux/amd64: pushed {AMD64}" in summary


def test_a_dropped_watch_re_attaches_to_the_build(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    address, fake = coordinator
    fake.drop_watches = 2
    monkeypatch.setattr(api, "RECONNECT_DELAY", 0.01)
    assert cli.main(build_argv(address, context_dir)) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [INDEX]
    assert err.count("re-attaching to build b-1") == 2
    assert err.count("[linux/arm64] queued") == 1


def test_bad_platform_exits_2_naming_it(
    context_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build", "--platform", "linux/amd64,linux/sparc", "-t", TAGS[0], str(context_dir)]
    assert cli.main(argv) == 2
    assert "sparc" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        (["Team/App:1"], "invalid tag 'Team/App:1'"),
        (["registry.example/team/app@sha256:" + "0" * 64], "not a digest"),
    ],
)
def test_bad_tags_exit_2(
    context_dir: Path, capsys: pytest.CaptureFixture[str], tags: list[str], message: str
) -> None:
    argv = ["build", "--platform", "linux/amd64", *(f"-t{t}" for t in tags), str(context_dir)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("app", "docker.io/library/app:latest"),
        ("user/app:1", "docker.io/user/app:1"),
        ("registry.gitlab.com/g/p", "registry.gitlab.com/g/p:latest"),
        ("localhost:5000/app:2", "localhost:5000/app:2"),
    ],
)
def test_tags_are_normalised_the_docker_way(
    coordinator: tuple[str, FakeCoordinator], context_dir: Path, given: str, sent: str
) -> None:
    address, fake = coordinator
    argv = ["build", "--coordinator", address, "--insecure", "--platform", "linux/amd64",
            "-t", given, str(context_dir)]  # fmt: skip
    assert cli.main(argv) == 0
    assert list(fake.submitted[-1].tags) == [sent]


def test_missing_context_dir_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-dir"
    assert cli.main(["build", "--platform", "linux/amd64", "-t", TAGS[0], str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_missing_dockerfile_exits_2_naming_it(
    context_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build", "--platform", "linux/amd64", "-t", TAGS[0], "-f", "nope/Dockerfile"]
    assert cli.main([*argv, str(context_dir)]) == 2
    assert "nope/Dockerfile" in capsys.readouterr().err


def test_unreachable_coordinator_exits_3_naming_the_address(
    context_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv(api.COORDINATOR_ENV, address)
    argv = ["build", "--connect-timeout", "0.5", "--platform", "linux/amd64", "-t", TAGS[0]]
    assert cli.main([*argv, str(context_dir)]) == 3
    err = capsys.readouterr().err
    assert f"cannot reach the polyarch coordinator at {address}" in err
    assert "connection refused" in err
    assert cli.main(["agents", "--connect-timeout", "0.5"]) == 3


def test_interrupt_names_the_build_that_keeps_running(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(api.BuildClient, "follow", interrupted)
    assert cli.main(build_argv(coordinator[0], context_dir)) == 130
    assert "polyarch cancel b-1" in capsys.readouterr().err


def test_agents_json_and_table(
    coordinator: tuple[str, FakeCoordinator], capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = coordinator
    assert cli.main(["agents", "--json", "--coordinator", address]) == 0
    agents = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in agents] == ["agent-a", "agent-b"]
    assert agents[0]["state"] == "ready"
    assert agents[0]["native_platforms"] == ["linux/amd64"]
    assert agents[0]["emulated_platforms"] == ["linux/arm/v7"]
    assert agents[1]["running"][0]["platform"] == "linux/arm64"
    assert cli.main(["agents", "--coordinator", address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "STATE",
        "BUILDER",
        "NATIVE",
        "EMULATED",
        "SLOTS",
        "RUNNING",
    ]
    assert lines[2].split() == [
        "agent-b",
        "draining",
        "buildah",
        "linux/arm64",
        "-",
        "1/1",
        "b-1/linux/arm64",
    ]


def test_builds_json_table_and_cancel(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, _ = coordinator
    assert cli.main(build_argv(address, context_dir)) == 0
    capsys.readouterr()
    assert cli.main(["builds", "--json", "--coordinator", address]) == 0
    builds = json.loads(capsys.readouterr().out)
    assert builds[0]["id"] == "b-1"
    assert builds[0]["state"] == "succeeded"
    assert builds[0]["index_digest"] == INDEX
    assert {j["platform"]: j["digest"] for j in builds[0]["jobs"]} == {
        "linux/amd64": AMD64,
        "linux/arm64": ARM64,
    }
    assert builds[0]["jobs"][0]["agent"] == "agent-a"
    assert cli.main(["builds", "--coordinator", address]) == 0
    table = capsys.readouterr().out
    assert "INDEX-DIGEST" in table and f"    linux/arm64  pushed  agent-b  native  {ARM64}" in table
    assert cli.main(["cancel", "b-1", "--coordinator", address]) == 0
    assert "b-1: cancelled" in capsys.readouterr().out
    assert cli.main(["cancel", "b-404", "--coordinator", address]) == 1
    assert "no build b-404" in capsys.readouterr().err


def recorder(seen: list[Any]) -> Callable[..., int]:
    def run(*args: Any) -> int:
        seen.append(args[0] if len(args) == 1 else args)
        return 0

    return run


def test_agent_flags_are_parsed_and_handed_to_run_agent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Any] = []
    runtime = types.ModuleType("polyarch.agent.runtime")
    runtime.run_agent = recorder(seen)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "polyarch.agent.runtime", runtime)
    argv = ["agent", "--coordinator", "10.0.0.1:7600", "--name", "a1", "--builder", "docker"]
    assert cli.main([*argv, "--native", "linux/amd64", "--emulated", "linux/arm64,linux/arm"]) == 0
    config, args = seen[0]
    assert [str(p) for p in config.native] == ["linux/amd64"]
    assert [str(p) for p in config.emulated] == ["linux/arm64", "linux/arm/v7"]
    assert (config.coordinator, config.name, config.builder) == ("10.0.0.1:7600", "a1", "docker")
    assert (config.slots, config.docker_binary, config.work_dir) == (2, "docker", None)
    assert config.metrics_listen == "" and config.insecure_registries == []
    assert args.replace is False  # the credential flags and --replace stay on args
    assert cli.main(argv) == 0
    assert (seen[1][0].native, seen[1][0].emulated) == (None, None)  # the agent detects them
    assert cli.main([*argv, "--slots", "0"]) == 2
    assert cli.main([*argv, "--native", "linux/sparc"]) == 2
    assert "sparc" in capsys.readouterr().err
    assert cli.main([*argv, "--native", "linux/amd64", "--emulated", "linux/amd64"]) == 2


def fake_coordinator_entry(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Stands in for `polyarch coordinator`'s entry point; returns what it is handed."""
    seen: list[Any] = []
    server = types.ModuleType("polyarch.coordinator.server")
    server.run_coordinator = recorder(seen)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "polyarch.coordinator.server", server)
    return seen


def test_coordinator_flags_are_handed_to_run_coordinator(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = fake_coordinator_entry(monkeypatch)
    argv = ["coordinator", "--data-dir", str(tmp_path), "--insecure-registry", "localhost:5000"]
    assert cli.main([*argv, "--metrics-listen", "off"]) == 0
    config = config_from(seen[0])
    assert (config.listen, config.data_dir, config.metrics_listen) == (
        "127.0.0.1:7600", tmp_path, ""
    )  # fmt: skip
    assert config.insecure_registries == ["localhost:5000"]
    assert cli.main(["coordinator", "--data-dir", str(tmp_path), "--listen", "nonsense"]) == 2


def test_coordinator_config_is_defaults_then_file_then_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = fake_coordinator_entry(monkeypatch)
    config_file = tmp_path / "coordinator.toml"
    config_file.write_text(
        '[coordinator]\nlisten = "0.0.0.0:7700"\ndata_dir = "/srv/polyarch"\n'
        'advertise = ["farm.example"]\nagent_timeout = 20\n'
        '[coordinator.limits]\nmax_tags = 16\nmax_context_bytes = "1GiB"\n'
    )
    argv = ["coordinator", "--config", str(config_file), "--listen", "127.0.0.1:7800",
            "--limit", "max_tags=4"]  # fmt: skip
    assert cli.main(argv) == 0
    config = config_from(seen[0])
    assert config.listen == "127.0.0.1:7800"  # the flag wins over the file
    assert config.data_dir == Path("/srv/polyarch") and config.advertise == ["farm.example"]
    assert config.agent_timeout == 20.0 and config.metrics_listen == "127.0.0.1:9600"
    assert config.limits.max_tags == 4 and config.limits.max_context_bytes == 1 << 30
    config_file.write_text('[coordinator]\nlistn = "typo"\n')
    with pytest.raises(ConfigError, match=r"unknown coordinator setting.*listn"):
        config_from(seen[0])


def test_builds_table_says_why_a_job_was_requeued() -> None:
    job = build_pb2.Job(
        id="j-1", platform="linux/arm64", state=common_pb2.JOB_STATE_PUSHED, agent="agent-b",
        attempt=2, requeue_reasons=["agent agent-a went silent (lease expired)"],
    )  # fmt: skip
    build = build_pb2.Build(id="b-9", state=common_pb2.BUILD_STATE_SUCCEEDED, jobs=[job])
    lines = render.builds_table([build])
    assert "attempt 2" in lines[2]
    assert lines[3] == "      linux/arm64 re-queued: agent agent-a went silent (lease expired)"


def test_a_context_over_the_coordinators_limit_is_refused_before_uploading(
    coordinator: tuple[str, FakeCoordinator],
    context_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = coordinator
    fake.max_context_bytes = 10
    assert cli.main(build_argv(address, context_dir)) == 1
    err = capsys.readouterr().err
    assert "accepts at most 10" in err and "max_context_bytes" in err
    assert fake.contexts == {} and fake.submitted == []

"""Issue 3 on real processes: agents in containers killed, cut off, and the coordinator SIGKILLed.

Each agent is its own container on a docker network the test creates; the
coordinator is a `polyarch coordinator` subprocess on that network's gateway.
After every fault the published index is checked with skopeo and
`docker run --platform`, never with polyarch's own client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_containers import Fleet, running_fleet, wait_for
from tests.support.background_build import (
    SLOW_DOCKERFILE,
    TWO,
    BackgroundBuild,
    jobs_by_platform,
)
from tests.support.services import Registry
from tests.support.verify import docker_run_uname, image_entries, index_platforms, skopeo_raw

UNAME = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}
HEARTBEAT_INTERVAL = 3.0  # the agent's default


def assert_moved_off(victim: str, jobs: list[dict[str, Any]]) -> None:
    """Each job that was on the victim ended elsewhere, on a later attempt, saying why."""
    for job in jobs:
        assert job["agent"] != victim, job
        assert job["attempt"] >= 2, job
        assert any(victim in reason for reason in job["requeue_reasons"]), job


@pytest.fixture
def fleet(tmp_path: Path, registry: Registry) -> Iterator[Fleet]:
    with running_fleet(tmp_path / "fleet", ["agent-a", "agent-b"]) as running:
        try:
            yield running
        finally:
            print(running.diagnostics())  # shown by pytest only when the test fails


@pytest.fixture
def slow_context(tmp_path: Path) -> Path:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(SLOW_DOCKERFILE)
    return context


@pytest.fixture
def background_builds() -> Iterator[list[BackgroundBuild]]:
    started: list[BackgroundBuild] = []
    yield started
    for build in started:
        build.close()


def verify_published(
    tag: str, build: dict[str, Any], docker_binary: str, platforms: list[str] = TWO
) -> None:
    """skopeo: exactly one entry per platform, the digests the coordinator reported; and
    `docker run --platform` of each platform reports the right machine."""
    reported = {job["platform"]: job["digest"] for job in build["jobs"]}
    index = skopeo_raw(tag)
    assert len(image_entries(index)) == len(platforms), index
    assert index_platforms(index) == reported
    assert sorted(reported) == sorted(platforms)
    for platform in platforms:
        assert docker_run_uname(docker_binary, tag, platform) == UNAME[platform]


def heartbeat_after_reconnect(fleet: Fleet, name: str) -> bool:
    """True once the coordinator saw a heartbeat the agent made on its current stream."""
    for agent in fleet.agents_json():
        if agent["name"] == name and agent["state"] == "ready" and agent["last_heartbeat"]:
            connected = datetime.fromisoformat(agent["connected_at"])
            beat = datetime.fromisoformat(agent["last_heartbeat"])
            return (beat - connected).total_seconds() >= HEARTBEAT_INTERVAL * 0.6
    return False


@pytest.mark.emulated
def test_agent_killed_mid_build_is_replaced(
    fleet: Fleet, registry: Registry, base_image: str, unique_repo: str, slow_context: Path,
    docker_binary: str, background_builds: list[BackgroundBuild],
) -> None:  # fmt: skip
    # Each agent is its own container with its own address on the test's network.
    peers = {a["name"]: a["peer"] for a in fleet.agents_json()}
    for name, agent in fleet.agents.items():
        assert peers[name].startswith(f"ipv4:{agent.ip()}:"), peers
    assert len({peer.rsplit(":", 1)[0] for peer in peers.values()}) == len(fleet.agents)
    tag = f"{registry.address}/{unique_repo}:killed"
    run = BackgroundBuild(fleet, slow_context, tag, base_image)
    background_builds.append(run)
    build_id = run.build_id()
    victim, on_victim = run.victim(build_id)
    fleet.agents[victim].kill()

    code, out, err = run.result()
    assert code == 0, err
    assert victim not in fleet.ready_agents()
    build = fleet.build_json(build_id)
    assert build["state"] == "succeeded"
    assert out.strip().splitlines()[-1] == build["index_digest"]
    jobs = jobs_by_platform(build)
    for platform in on_victim:
        assert jobs[platform]["state"] == "pushed"
    assert_moved_off(victim, [jobs[p] for p in on_victim])
    verify_published(tag, build, docker_binary)


@pytest.mark.emulated
def test_agent_cut_off_from_the_network(
    fleet: Fleet, registry: Registry, base_image: str, unique_repo: str, slow_context: Path,
    docker_binary: str, background_builds: list[BackgroundBuild],
) -> None:  # fmt: skip
    tag = f"{registry.address}/{unique_repo}:cut-off"
    run = BackgroundBuild(fleet, slow_context, tag, base_image)
    background_builds.append(run)
    build_id = run.build_id()
    victim, on_victim = run.victim(build_id)
    fleet.agents[victim].disconnect()
    # The agent is alive and may still finish and push its attempt through the host's
    # dockerd; only its messages can't reach the coordinator, whose lease on it expires.

    code, _, err = run.result()
    assert code == 0, err
    build = fleet.build_json(build_id)
    assert build["state"] == "succeeded"
    jobs = jobs_by_platform(build)
    assert_moved_off(victim, [jobs[p] for p in on_victim])
    verify_published(tag, build, docker_binary)

    fleet.agents[victim].reconnect()
    fleet.wait_agents_ready(victim, timeout=90)
    # What the agent queued while cut off (the fenced-off attempt's result, if it finished)
    # goes out first on the new stream; a heartbeat made after the reconnect comes later.
    wait_for(
        lambda: heartbeat_after_reconnect(fleet, victim), timeout=30,
        message=f"a fresh heartbeat from {victim} after it reconnected",
    )  # fmt: skip
    # The late messages of the fenced-off attempt changed nothing.
    assert fleet.build_json(build_id) == build
    assert index_platforms(skopeo_raw(tag)) == {p: j["digest"] for p, j in jobs.items()}


@pytest.mark.emulated
def test_coordinator_sigkill_mid_build(
    fleet: Fleet, registry: Registry, base_image: str, unique_repo: str, slow_context: Path,
    docker_binary: str, background_builds: list[BackgroundBuild],
) -> None:  # fmt: skip
    tag = f"{registry.address}/{unique_repo}:restart"
    run = BackgroundBuild(fleet, slow_context, tag, base_image)
    background_builds.append(run)
    build_id = run.build_id()
    run.wait_running_on_some_agent(build_id, "linux/amd64")
    before = fleet.build_json(build_id)
    assert before["state"] not in ("succeeded", "failed", "cancelled")

    fleet.coordinator.sigkill()
    # down for longer than the ~5 s after which the CLI's watch used to fail ("Channel is
    # closed"): the outage is the scenario, not a wait for a condition
    time.sleep(12)
    fleet.coordinator.start()  # same data dir, same address

    # The unfinished build survived the crash, with its jobs.
    after = fleet.build_json(build_id)
    assert [j["platform"] for j in after["jobs"]] == [j["platform"] for j in before["jobs"]]
    assert after["tags"] == [tag]
    # Both agents come back by themselves.
    fleet.wait_agents_ready("agent-a", "agent-b", timeout=60)

    code, out, err = run.result()
    assert code == 0, err
    assert err.count("lost the coordinator") == 1, err  # said once, then re-attached
    builds = [b for b in fleet.builds_json() if tag in b["tags"]]
    assert [b["id"] for b in builds] == [build_id]
    build = builds[0]
    assert build["state"] == "succeeded"
    assert out.strip().splitlines()[-1] == build["index_digest"]
    assert all(job["state"] == "pushed" for job in build["jobs"]), build
    verify_published(tag, build, docker_binary)

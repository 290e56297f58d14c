"""Issue 14 on real processes: two coordinators on one PostgreSQL, agents in containers, a
3-platform build, and the active coordinator SIGKILLed or cut off from the database.

What was published is checked with skopeo and `docker run --platform`; what was assigned is
read from the database's job transitions; neither through polyarch's own client.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent_containers import wait_for
from tests.support.background_build import SLOW_DOCKERFILE, BackgroundBuild, jobs_by_platform
from tests.support.ha_fleet import (
    HAFleet,
    is_active,
    job_ids_of,
    logged_at,
    metric,
    running_ha_fleet,
)
from tests.support.pg_partition import partitionable
from tests.support.services import Registry
from tests.support.verify import docker_run_uname, image_entries, index_platforms, skopeo_raw

THREE = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
UNAME = {"linux/amd64": "x86_64", "linux/arm64": "aarch64", "linux/arm/v7": "armv7l"}
TAKEOVER_LIMIT = 15.0  # the bound, SIGKILL to the standby active
SERVER_SILENCE = 8.0  # coordinator/ha/election.py: when PostgreSQL drops a silent session
LEASE = 4.0  # the election's default lease: a cut-off active stops within it


def three_build(fleet: HAFleet, context: Path, tag: str, base_image: str) -> BackgroundBuild:
    """`polyarch build` of three platforms in the background, given both coordinators."""
    return BackgroundBuild(fleet, context, tag, base_image, THREE)


@pytest.fixture
def slow_three(tmp_path: Path) -> Path:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(SLOW_DOCKERFILE)
    return context


@pytest.fixture
def runs() -> Iterator[list[BackgroundBuild]]:
    started: list[BackgroundBuild] = []
    yield started
    for run in started:
        run.close()


def all_running(fleet: HAFleet, build_id: str) -> bool:
    jobs = fleet.build_json(build_id)["jobs"]
    return len(jobs) == len(THREE) and all(j["state"] == "running" for j in jobs)


def verify_exactly_once(fleet: HAFleet, tag: str, run: BackgroundBuild, docker: str) -> None:
    """The CLI succeeded; one build for the tag, every job pushed; the index (skopeo) holds
    exactly the reported digests; each platform runs as its machine; no (job, attempt) was
    ever assigned twice."""
    code, out, err = run.result()
    assert code == 0, err + fleet.diagnostics()
    builds = [b for b in fleet.builds_json() if tag in b["tags"]]
    assert len(builds) == 1, builds
    build = builds[0]
    assert build["state"] == "succeeded"
    assert out.strip().splitlines()[-1] == build["index_digest"]
    reported = {job["platform"]: job["digest"] for job in build["jobs"]}
    index = skopeo_raw(tag)
    assert len(image_entries(index)) == len(THREE) and index_platforms(index) == reported
    for platform in THREE:
        assert docker_run_uname(docker, tag, platform) == UNAME[platform]
    mine = job_ids_of(build)
    counts = Counter(a for a in fleet.assignments() if a[0] in mine)
    assert counts and max(counts.values()) == 1, counts


@pytest.mark.emulated
def test_sigkill_of_the_active_mid_build_completes_it_exactly_once(
    tmp_path: Path, postgres_dsn: str, registry: Registry, base_image: str, unique_repo: str,
    slow_three: Path, docker_binary: str, runs: list[BackgroundBuild],
) -> None:  # fmt: skip
    agents = ["agent-a", "agent-b", "agent-c"]  # one slot each: the first build fills them
    with running_ha_fleet(tmp_path / "fleet", postgres_dsn, agents, slots=1) as fleet:
        try:
            tag = f"{registry.address}/{unique_repo}:takeover"
            run = three_build(fleet, slow_three, tag, base_image)
            runs.append(run)
            build_id = run.build_id()
            wait_for(lambda: all_running(fleet, build_id), timeout=90,
                     message="all three jobs running")  # fmt: skip
            # a build queued behind it, its context uploaded to the old active only: the new
            # one must hand it to agents from the shared --context-dir
            (queued_context := tmp_path / "queued").mkdir()
            (queued_context / "Dockerfile").write_text(SLOW_DOCKERFILE + "COPY marker /\n")
            (queued_context / "marker").write_text("queued across the takeover\n")
            queued = three_build(fleet, queued_context, f"{tag}-queued", base_image)
            runs.append(queued)
            queued_id = queued.build_id()
            states = [j["state"] for j in fleet.build_json(queued_id)["jobs"]]
            assert states == ["queued"] * 3, states
            old = fleet.active()
            assert old is fleet.coordinator

            old.sigkill()
            killed = time.monotonic()
            # a submit during the takeover: the CLI retries it by itself (one key)
            during = three_build(fleet, slow_three, f"{tag}-during", base_image)
            runs.append(during)
            new = fleet.active(timeout=TAKEOVER_LIMIT + 5)
            took = time.monotonic() - killed
            assert new is fleet.standby and took <= TAKEOVER_LIMIT, took
            print(f"takeover after SIGKILL mid-build: {took:.2f} s")
            fleet.wait_agents_ready(*agents, timeout=30)

            verify_exactly_once(fleet, tag, run, docker_binary)
            attempts = {
                p: j["attempt"] for p, j in jobs_by_platform(fleet.build_json(build_id)).items()
            }
            assert attempts == dict.fromkeys(THREE, 1), attempts  # re-attached, not re-run
            verify_exactly_once(fleet, f"{tag}-during", during, docker_binary)
            verify_exactly_once(fleet, f"{tag}-queued", queued, docker_binary)
            # the queued build's context reached agents from the new active, which never
            # received it: the shared context dir
            assert (metric(new, "polyarch_context_bytes_served_total") or 0) > 0
            assert metric(new, "polyarch_context_bytes_received_total") == 0
            assert "active for term 2" in new.log_path.read_text()
        except BaseException:
            print(fleet.diagnostics())
            raise


@pytest.mark.emulated
def test_an_active_cut_off_from_the_database_stops_before_the_standby_starts(
    tmp_path: Path, postgres_dsn: str, registry: Registry, base_image: str, unique_repo: str,
    slow_three: Path, docker_binary: str, runs: list[BackgroundBuild],
) -> None:  # fmt: skip
    with (
        partitionable(postgres_dsn, tmp_path) as (proxy, proxied),
        running_ha_fleet(
            tmp_path / "fleet", postgres_dsn, ["agent-a", "agent-b"], active_dsn=proxied
        ) as fleet,
    ):
        try:
            tag = f"{registry.address}/{unique_repo}:partition"
            run = three_build(fleet, slow_three, tag, base_image)
            runs.append(run)
            build_id = run.build_id()
            wait_for(lambda: all_running(fleet, build_id), timeout=90,
                     message="all three jobs running")  # fmt: skip
            old, standby = fleet.coordinator, fleet.standby
            assert standby is not None and is_active(old)

            proxy.freeze()  # nothing passes between the active and the database
            frozen = time.monotonic()
            assert old.proc is not None
            wait_for(lambda: not is_active(old), timeout=LEASE + 3, interval=0.05,
                     message="the cut-off active standing down")  # fmt: skip
            stopped = time.monotonic()  # its gate closed: it serves and dispatches nothing
            code = old.proc.wait(timeout=10)
            assert code == 4, old.logs()[-3000:]  # demoted: its supervisor restarts it
            assert not is_active(standby)  # the server still holds the silent session's lock
            # the server drops the silent session when its keepalives say so, not before
            time.sleep(max(0.0, SERVER_SILENCE - (time.monotonic() - frozen)))
            proxy.cut_server_side()
            assert fleet.active(timeout=TAKEOVER_LIMIT) is standby
            print(f"cut off: the active stopped after {stopped - frozen:.2f} s, the standby "
                  f"was active {time.monotonic() - frozen:.2f} s after the cut")  # fmt: skip
            demoted = logged_at(old, "no longer the active coordinator")
            promoted = logged_at(standby, "high availability: active for term")
            assert demoted < promoted, (demoted, promoted)

            fleet.wait_agents_ready("agent-a", "agent-b", timeout=30)
            verify_exactly_once(fleet, tag, run, docker_binary)
        except BaseException:
            print(fleet.diagnostics())
            raise

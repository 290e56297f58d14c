"""Bounded churn: many multi-platform builds while agent containers are killed and restarted.

Three agents in their own containers; a background thread `docker kill`s a random
one every few seconds and `docker start`s it again at the next tick (at most one
down at a time, so at least two stay alive). Meanwhile >= 50 two-platform builds
(linux/amd64 native, linux/arm64 emulated) are submitted through the real CLI,
several at a time. Afterwards: no build lost, none listed twice, each in exactly
one terminal state (and counted once by the coordinator's metrics), and every
succeeded build's index read back with skopeo holds exactly one child per platform
with the digests the coordinator reported.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent_containers import TERMINAL_BUILD_STATES, Fleet, running_fleet
from tests.support.services import Registry
from tests.support.verify import docker_run_uname, image_entries, index_platforms, skopeo_raw

BUILDS = 50
CONCURRENCY = 6
PLATFORMS = ["linux/amd64", "linux/arm64"]
AGENTS = ["churn-1", "churn-2", "churn-3"]
KILL_EVERY = (5.0, 10.0)  # seconds between chaos ticks (random in this range)
BUILD_TIMEOUT = 240.0
DOCKERFILE = "ARG BASE\nFROM ${BASE}\nARG N\nRUN echo $N > /n\n"
UNAME = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}


@dataclass
class Chaos:
    """Kills a random live agent each tick and restarts the one killed at the previous tick."""

    fleet: Fleet
    seed: int
    stop: threading.Event = field(default_factory=threading.Event)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(self.seed)
        agents = list(self.fleet.agents.values())
        down = None
        try:
            # Paces the faults (load generation), not a synchronisation point.
            while not self.stop.wait(rng.uniform(*KILL_EVERY)):
                if down is not None:
                    down.restart()
                    self.events.append((time.monotonic(), "restart", down.name))
                victim = rng.choice([a for a in agents if a is not down])
                victim.kill()
                self.events.append((time.monotonic(), "kill", victim.name))
                down = victim
            if down is not None:
                down.restart()
                self.events.append((time.monotonic(), "restart", down.name))
        except BaseException as exc:  # surfaced by the test after join()
            self.error = exc

    @property
    def killed(self) -> set[str]:
        return {name for _, what, name in self.events if what == "kill"}


@dataclass
class Submitted:
    number: int
    tag: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@pytest.fixture
def fleet(tmp_path: Path, registry: Registry) -> Iterator[Fleet]:
    with running_fleet(tmp_path / "fleet", AGENTS) as running:
        try:
            yield running
        finally:
            print(running.diagnostics()[-8000:])


def finished_counts(fleet: Fleet) -> Counter[str]:
    """polyarch_builds_finished_total by result, scraped from the coordinator's metrics."""
    with httpx.Client(trust_env=False, timeout=10) as client:
        text = client.get(f"http://{fleet.coordinator.metrics_listen}/metrics").text
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "polyarch_builds_finished":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["result"]] += int(sample.value)
    return counts


def run_in_container(docker: str, reference: str, platform: str, *command: str) -> str:
    out = subprocess.run(
        [docker, "run", "--rm", "--pull", "always", "--platform", platform, reference, *command],
        check=True, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    return out.stdout.strip()


def failed_job(job: dict[str, Any]) -> dict[str, Any]:
    keys = ("platform", "agent", "attempt", "failed_step", "error", "requeue_reasons")
    return {key: job[key] for key in keys}


def failure_is_justified(build: dict[str, Any], killed: set[str]) -> bool:
    """A build may fail under churn only when a job gave up after every attempt was lost to a
    killed agent; any other failure is a bug."""
    failed = [j for j in build["jobs"] if j["state"] == "failed"]
    return bool(failed) and all(
        j["error"].startswith("gave up after")
        and j["requeue_reasons"]
        and all(any(name in reason for name in killed) for reason in j["requeue_reasons"])
        for j in failed
    )


@pytest.mark.emulated
@pytest.mark.timeout(480)
def test_builds_survive_agent_churn(
    fleet: Fleet, registry: Registry, base_image: str, unique_repo: str, docker_binary: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    repo = f"{registry.address}/{unique_repo}"
    nonce = f"{time.time_ns():x}"
    seed = random.SystemRandom().randrange(1 << 32)
    print(f"churn seed {seed}")

    def submit(number: int) -> Submitted:
        tag = f"{repo}:b{number}"
        started = time.monotonic()
        done = fleet.cli(
            "build", "--platform", ",".join(PLATFORMS), "-t", tag, "--progress", "quiet",
            "--build-arg", f"BASE={base_image}", "--build-arg", f"N={nonce}-{number}",
            str(context), timeout=BUILD_TIMEOUT,
        )  # fmt: skip
        return Submitted(number, tag, done.returncode, done.stdout, done.stderr,
                         time.monotonic() - started)  # fmt: skip

    chaos = Chaos(fleet, seed)
    chaos_thread = threading.Thread(target=chaos.run, name="chaos", daemon=True)
    started = time.monotonic()
    chaos_thread.start()
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            submitted = list(pool.map(submit, range(BUILDS)))
    finally:
        chaos.stop.set()
        chaos_thread.join(timeout=60)
    wall = time.monotonic() - started
    assert chaos.error is None, f"chaos thread failed: {chaos.error!r}"
    fleet.wait_agents_ready(*AGENTS, timeout=60)

    # -- what the coordinator says happened --------------------------------------------------
    listed = [b for b in fleet.builds_json(limit=10 * BUILDS) if b["tags"][0].startswith(repo)]
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for build in listed:
        for tag in build["tags"]:
            by_tag.setdefault(tag, []).append(build)
    lost = [s.tag for s in submitted if s.tag not in by_tag]
    duplicated = {t: [b["id"] for b in builds] for t, builds in by_tag.items() if len(builds) > 1}
    states = Counter(b["state"] for b in listed)
    metrics = finished_counts(fleet)
    killed = chaos.killed
    failed = [b for b in listed if b["state"] == "failed"]
    unjustified = [b["id"] for b in failed if not failure_is_justified(b, killed)]
    attempts = Counter(j["attempt"] for b in listed for j in b["jobs"])
    kills = sum(1 for e in chaos.events if e[1] == "kill")
    report = {
        "seed": seed,
        "builds_submitted": len(submitted),
        "builds_listed": len(listed),
        "states": dict(states),
        "metrics_finished": dict(metrics),
        "lost": lost,
        "duplicated": duplicated,
        "unjustified_failures": unjustified,
        "failed": {
            b["id"]: [failed_job(j) for j in b["jobs"] if j["state"] == "failed"] for b in failed
        },
        "job_attempts": {str(k): v for k, v in sorted(attempts.items())},
        "kills": kills,
        "restarts": sum(1 for e in chaos.events if e[1] == "restart"),
        "wall_seconds": round(wall, 1),
        "cli_exit_codes": dict(Counter(s.returncode for s in submitted)),
    }
    (tmp_path / "churn-report.json").write_text(json.dumps(report, indent=2))
    print("churn report:", json.dumps(report, indent=2))

    assert kills >= 3, "too few faults were injected to call this churn"
    assert lost == [], "builds lost"
    assert duplicated == {}, "one submit produced more than one build"
    assert len(listed) == BUILDS
    assert set(states) <= TERMINAL_BUILD_STATES, states
    # Each build reached its terminal state exactly once (counted once by the coordinator).
    assert sum(metrics.values()) == BUILDS, metrics
    assert metrics == Counter({k: v for k, v in states.items()}), (metrics, states)
    assert unjustified == [], report["failed"]

    # -- what the CLI and the registry say ----------------------------------------------------
    build_of = {tag: builds[0] for tag, builds in by_tag.items()}
    all_children: list[str] = []
    for sub in submitted:
        build = build_of[sub.tag]
        assert (sub.returncode == 0) == (build["state"] == "succeeded"), (sub, build)
        if build["state"] != "succeeded":
            continue
        assert sub.stdout.strip() == build["index_digest"], sub
        assert all(j["state"] == "pushed" for j in build["jobs"]), build
        reported = {j["platform"]: j["digest"] for j in build["jobs"]}
        index = skopeo_raw(sub.tag)
        assert len(image_entries(index)) == len(PLATFORMS), (sub.tag, index)
        assert index_platforms(index) == reported, sub.tag
        all_children.extend(reported.values())
    # Every build wrote its own N: no child image was shared between builds or reused.
    assert len(all_children) == len(set(all_children))

    succeeded = [s for s in submitted if build_of[s.tag]["state"] == "succeeded"]
    assert succeeded, "no build succeeded"
    for sample in (succeeded[0], succeeded[-1]):
        for platform in PLATFORMS:
            assert docker_run_uname(docker_binary, sample.tag, platform) == UNAME[platform]
            content = run_in_container(docker_binary, sample.tag, platform, "cat", "/n")
            assert content == f"{nonce}-{sample.number}"

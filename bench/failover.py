"""Measures failover: from a fault on the agent running a job to that job running elsewhere.

Run with `.venv/bin/python bench/failover.py [--runs 5] [--fault kill|disconnect]`.
Sets up what the fault tests use (tests/support/agent_containers.py): a session
registry on 127.0.0.1 with the offline busybox base, a `polyarch coordinator`
subprocess on the gateway of a docker network it creates, and two agent
containers. Each run submits a one-platform build whose step sleeps, waits until
the job is `running` on agent X, injects the fault on X (`docker kill`, or
`docker network disconnect`), and times until the coordinator shows the job
`assigned` and then `running` on the other agent. The job's state is polled
in-process through polyarch's gRPC client every 50 ms, so the resolution is about
that. Prints every run and the median and max; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# testcontainers' reaper image can't be pulled here.
os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"

from polyarch.client.api import BuildClient  # noqa: E402
from polyarch.client.credentials import Credentials  # noqa: E402
from polyarch.proto.v1 import build_pb2, common_pb2  # noqa: E402
from tests.support import services  # noqa: E402
from tests.support.agent_containers import Fleet, running_fleet  # noqa: E402

AGENTS = ("bench-a", "bench-b")
PLATFORM = "linux/amd64"
# Long enough that the killed attempt never finishes first; NONCE keeps it out of the cache.
DOCKERFILE = 'ARG BASE\nFROM ${BASE}\nARG NONCE\nRUN echo "$NONCE" > /nonce && sleep 60\n'
POLL = 0.05
FAILOVER_TIMEOUT = 120.0


@dataclass
class Run:
    victim: str
    to_assigned: float  # fault -> job assigned on another agent
    to_running: float  # fault -> job running on another agent


async def job_of(client: BuildClient, build_id: str) -> build_pb2.Job:
    build = await client.get_build(build_id)
    return next(j for j in build.jobs if j.platform == PLATFORM)


async def wait_job(
    client: BuildClient, build_id: str, ok: Callable[[build_pb2.Job], object], what: str
) -> build_pb2.Job:
    deadline = time.monotonic() + FAILOVER_TIMEOUT
    while time.monotonic() < deadline:
        job = await job_of(client, build_id)
        if ok(job):
            return job
        await asyncio.sleep(POLL)
    raise TimeoutError(f"{what} not seen within {FAILOVER_TIMEOUT:g}s")


async def one_run(fleet: Fleet, context: Path, tag: str, base: str, fault: str) -> Run:
    submitted = await asyncio.to_thread(
        fleet.popen_cli, "build", "--platform", PLATFORM, "-t", tag, "--progress", "quiet",
        "--build-arg", f"BASE={base}", "--build-arg", f"NONCE={secrets.token_hex(8)}",
        str(context),
    )  # fmt: skip
    try:
        token = fleet.coordinator.admin_token_file.read_text().strip()
        async with BuildClient(fleet.address, credentials=Credentials(token=token)) as client:
            build_id = ""
            deadline = time.monotonic() + 30
            while not build_id and time.monotonic() < deadline:
                build_id = next((b.id for b in await client.list_builds(20) if tag in b.tags), "")
                await asyncio.sleep(POLL)
            first = await wait_job(
                client, build_id,
                lambda j: j.state == common_pb2.JOB_STATE_RUNNING and j.agent, "job running",
            )  # fmt: skip
            victim = fleet.agents[first.agent]
            started = time.monotonic()
            await asyncio.to_thread(victim.kill if fault == "kill" else victim.disconnect)

            def elsewhere(state: int) -> Callable[[build_pb2.Job], object]:
                return lambda j: (
                    j.attempt > first.attempt and j.agent not in ("", first.agent)
                    and j.state >= state
                )  # fmt: skip

            await wait_job(client, build_id, elsewhere(common_pb2.JOB_STATE_ASSIGNED), "assigned")
            assigned = time.monotonic() - started
            await wait_job(client, build_id, elsewhere(common_pb2.JOB_STATE_RUNNING), "running")
            running = time.monotonic() - started
            await client.cancel_build(build_id, "failover benchmark run done")
    finally:
        submitted.kill()
        submitted.communicate()
    await asyncio.to_thread(victim.restart if fault == "kill" else victim.reconnect)
    await asyncio.to_thread(fleet.wait_agents_ready, *AGENTS, timeout=90)
    return Run(victim.name, assigned, running)


def summary(label: str, values: list[float]) -> str:
    return f"{label}: median {statistics.median(values):.2f} s, max {max(values):.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fault", choices=["kill", "disconnect"], default="kill")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="polyarch-failover-") as tmp:
        work = Path(tmp)
        context = work / "context"
        context.mkdir()
        (context / "Dockerfile").write_text(DOCKERFILE)
        with services.running_registry(work / "registry") as registry:
            base = services.build_base_image(registry.address)
            with running_fleet(work / "fleet", AGENTS) as fleet:
                runs: list[Run] = []
                for n in range(args.runs):
                    tag = f"{registry.address}/polyarch-bench/failover:run{n}"
                    run = asyncio.run(one_run(fleet, context, tag, base, args.fault))
                    runs.append(run)
                    print(f"run {n + 1}: {args.fault} {run.victim}: assigned elsewhere after "
                          f"{run.to_assigned:.2f} s, running after {run.to_running:.2f} s",
                          flush=True)  # fmt: skip
    print(f"failover after `docker {'kill' if args.fault == 'kill' else 'network disconnect'}`"
          f" ({len(runs)} runs, 2 agents, poll {POLL * 1000:.0f} ms)")  # fmt: skip
    print("  " + summary("to assigned elsewhere", [r.to_assigned for r in runs]))
    print("  " + summary("to running elsewhere ", [r.to_running for r in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

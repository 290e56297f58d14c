"""Cancel, Ctrl-C, drain, agent SIGTERM and idempotent submit, on real builds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path

from polyarch.agent.builders.docker import DockerBuilder
from polyarch.client.api import BuildClient
from polyarch.client.credentials import Credentials
from tests.support.farm import POLYARCH, Farm
from tests.support.poll import poll_until
from tests.support.services import free_port
from tests.support.verify import skopeo_missing, skopeo_raw

# BUILD_ID is fresh per test so the shared dockerd never answers a slow step from cache.
SLOW = "ARG BASE\nFROM ${BASE}\nARG BUILD_ID\nRUN echo ${BUILD_ID} > /id && sleep {sleep}\n"


def slow_context(tmp_path: Path, seconds: int) -> Path:
    context = tmp_path / f"slow-{seconds}"
    context.mkdir()
    (context / "Dockerfile").write_text(SLOW.replace("{sleep}", str(seconds)))
    return context


# A shell that ran the suite in the background left SIGINT ignored, and an ignored signal
# stays ignored across exec. This launcher restores the default (as a terminal gives) and
# execs the CLI. Not preexec_fn: that forks a process whose gRPC threads must not fork.
_WITH_DEFAULT_SIGINT = [
    sys.executable, "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]  # fmt: skip


async def submit(farm: Farm, *args: str) -> tuple[asyncio.subprocess.Process, str]:
    """Starts `polyarch build` in the background; returns it and the build id it submitted."""
    proc = await asyncio.create_subprocess_exec(
        *_WITH_DEFAULT_SIGINT, POLYARCH, "build", "--coordinator", farm.address, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, POLYARCH_TOKEN_FILE=str(farm.admin_token_file)),
    )  # fmt: skip
    manager = farm.coordinator.manager
    assert manager is not None
    await poll_until(lambda: bool(list(manager.ledger.active())), timeout=30,
                     message="the build was never submitted")  # fmt: skip
    return proc, next(manager.ledger.active())[0].id


async def test_cancel_stops_the_builder_and_publishes_nothing(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    agent = await farm.add_agent("a", DockerBuilder(docker_binary), native=["linux/amd64"])
    tag = f"{registry.address}/{unique_repo}:cancelled"
    proc, build_id = await submit(
        farm, "--platform", "linux/amd64", "-t", tag, "--build-arg", f"BASE={base_image}",
        "--build-arg", f"BUILD_ID={uuid.uuid4().hex}", str(slow_context(tmp_path, 120)),
    )  # fmt: skip
    await poll_until(lambda: farm.build_started(build_id, "linux/amd64"), timeout=60,
                     message="the job never started")  # fmt: skip
    result = await farm.cli("cancel", build_id)
    assert result.returncode == 0, result.stderr
    assert "cancelled" in result.stdout
    # the agent stops the builder process within 10 s
    await poll_until(lambda: not agent.jobs, timeout=10, message="the builder still runs")
    assert await asyncio.wait_for(proc.wait(), 30) == 1
    assert skopeo_missing(tag)
    listed = json.loads((await farm.cli("builds", "--json")).stdout)
    assert listed[0]["state"] == "cancelled"


async def test_ctrl_c_with_cancel_on_interrupt_cancels_the_build(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    agent = await farm.add_agent("a", DockerBuilder(docker_binary), native=["linux/amd64"])
    proc, build_id = await submit(
        farm, "--cancel-on-interrupt", "--platform", "linux/amd64",
        "-t", f"{registry.address}/{unique_repo}:x", "--build-arg", f"BASE={base_image}",
        "--build-arg", f"BUILD_ID={uuid.uuid4().hex}", str(slow_context(tmp_path, 120)),
    )  # fmt: skip
    await poll_until(lambda: farm.build_started(build_id, "linux/amd64"), timeout=60,
                     message="the job never started")  # fmt: skip
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 30) == 130
    assert proc.stderr is not None
    assert f"build {build_id} cancelled" in (await proc.stderr.read()).decode()
    await poll_until(lambda: not agent.jobs, timeout=10, message="the builder still runs")
    manager = farm.coordinator.manager
    assert manager is not None
    assert (await manager.get(build_id))[0].state.value == "cancelled"


async def test_drained_agent_gets_no_new_jobs_until_undrained(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("a", DockerBuilder(docker_binary), native=["linux/amd64"])
    await farm.add_agent("b", DockerBuilder(docker_binary), native=["linux/amd64"])
    assert (await farm.cli("drain", "a")).returncode == 0
    agents = {a["name"]: a for a in json.loads((await farm.cli("agents", "--json")).stdout)}
    assert agents["a"]["state"] == "draining"
    metadata = tmp_path / "meta.json"
    tag = f"{registry.address}/{unique_repo}:1"
    for _ in range(2):
        result = await farm.cli("build", "--platform", "linux/amd64", "-t", tag,
                                "--build-arg", f"BASE={base_image}", "--metadata-file",
                                str(metadata), str(slow_context(tmp_path, 0)))  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert json.loads(metadata.read_text())["polyarch.platforms"]["linux/amd64"]["agent"] == "b"
        (tmp_path / "slow-0").rename(tmp_path / f"used-{metadata.stat().st_mtime_ns}")
    assert (await farm.cli("undrain", "a")).returncode == 0
    agents = {a["name"]: a for a in json.loads((await farm.cli("agents", "--json")).stdout)}
    assert agents["a"]["state"] == "ready"


async def test_sigterm_on_an_agent_hands_its_job_to_another(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    leaving = await farm.spawn_agent_process("leaving", docker_binary, "--shutdown-grace", "1")
    manager = farm.coordinator.manager
    assert manager is not None
    await poll_until(lambda: "leaving" in manager.sessions, timeout=30,
                     message="the agent process never connected")  # fmt: skip
    tag = f"{registry.address}/{unique_repo}:handed-back"
    proc, build_id = await submit(
        farm, "--platform", "linux/amd64", "-t", tag, "--build-arg", f"BASE={base_image}",
        "--build-arg", f"BUILD_ID={uuid.uuid4().hex}", str(slow_context(tmp_path, 6)),
    )  # fmt: skip
    await poll_until(lambda: farm.build_started(build_id, "linux/amd64"), timeout=60,
                     message="the job never started")  # fmt: skip
    await farm.add_agent("staying", DockerBuilder(docker_binary), native=["linux/amd64"])
    leaving.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(leaving.wait(), 30) == 0
    assert await asyncio.wait_for(proc.wait(), 120) == 0
    _, jobs = await manager.get(build_id)
    assert (jobs[0].agent, jobs[0].attempt) == ("staying", 2)
    assert "agent leaving shut down before the job finished" in jobs[0].requeue_reasons[0]
    assert skopeo_raw(tag)["manifests"][0]["digest"] == jobs[0].digest


async def test_the_same_idempotency_key_returns_the_same_build(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("a", DockerBuilder(docker_binary), native=["linux/amd64"])
    args = ["build", "--idempotency-key", f"ci-run-{uuid.uuid4().hex}", "--platform", "linux/amd64",
            "-t", f"{registry.address}/{unique_repo}:1", "--build-arg", f"BASE={base_image}",
            str(slow_context(tmp_path, 0))]  # fmt: skip
    first = await farm.cli(*args)
    second = await farm.cli(*args)
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout
    assert "attached to existing build" in second.stderr
    assert len(json.loads((await farm.cli("builds", "--json")).stdout)) == 1


async def test_sigterm_stops_the_coordinator_gracefully(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        POLYARCH, "coordinator", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path),
        "--metrics-listen", "off", "--agent-listen", f"127.0.0.1:{free_port()}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        token_file = tmp_path / "admin.token"
        await poll_until(token_file.exists, timeout=30, message="admin token written")
        credentials = Credentials(token=token_file.read_text().strip())
        async with BuildClient(
            f"127.0.0.1:{port}", connect_timeout=30, credentials=credentials
        ) as client:
            assert await client.list_builds() == []  # serving, not just listening
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

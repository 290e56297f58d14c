"""A real agent given both coordinators: it finds the active one, and rides a SIGKILL takeover."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import grpc

from polyarch.client.api import BuildClient
from polyarch.client.context import pack_context
from polyarch.client.credentials import Credentials
from polyarch.proto.trust import ClientTrust, aio_channel
from polyarch.proto.v1 import build_pb2, common_pb2, fleet_pb2, fleet_pb2_grpc, trust_pb2
from tests.support.farm import POLYARCH
from tests.support.ha_processes import Process, assert_standby, coordinator, first_admin
from tests.support.poll import poll_until
from tests.support.services import Registry, stop_process

TAKEOVER_LIMIT = 15.0  # SIGKILL of the active to the agent connected to the new one
MARKER = "polyarch-failover-step-started"


def agent_address(process: Process) -> str:
    """The coordinator's agent (mTLS) port, as its start line tells it."""
    found = re.search(r"listening on port \d+, agents on (\d+)", process.log())
    assert found, f"{process.name}: no agent port in its log"
    return f"127.0.0.1:{found.group(1)}"


def start_agent(
    work: Path, name: str, token: str, coordinators: list[Process], docker_binary: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """A real `polyarch agent` given the coordinators in this order (one host here, so each
    one's agent port is given too: on separate hosts enrolment's port serves them all)."""
    log_path = work / f"agent-{name}.log"
    env = dict(os.environ, POLYARCH_TOKEN=token)
    env.pop("POLYARCH_COORDINATOR", None)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [POLYARCH, "agent", "--coordinator", ",".join(c.address for c in coordinators),
             "--agent-channel", ",".join(agent_address(c) for c in coordinators),
             "--name", name, "--builder", "docker", "--docker-binary", docker_binary,
             "--native", "linux/amd64", "--emulated", "none", "--work-dir", str(work / name),
             "--shutdown-grace", "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    return proc, log_path


async def connected_agents(process: Process, trust: ClientTrust) -> list[fleet_pb2.Agent]:
    """The agents connected to `process` itself ([] while it refuses: a standby). A raw
    call: BuildClient would follow the standby's redirect and list the active's agents."""
    async with aio_channel(process.address, trust) as channel:
        try:
            reply = await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
                fleet_pb2.ListAgentsRequest(), timeout=5
            )
        except grpc.aio.AioRpcError:
            return []
    return [agent for agent in reply.agents if agent.state == fleet_pb2.AGENT_STATE_READY]


def creds(trust: ClientTrust) -> Credentials:
    return Credentials(token=trust.token, ca_pem=trust.root_pem)


async def the_job(client: BuildClient, build_id: str) -> build_pb2.Job:
    build = await client.retrying(lambda: client.get_build(build_id))
    assert len(build.jobs) == 1, build
    return build.jobs[0]


async def wait_for_marker(client: BuildClient, build_id: str) -> None:
    """Until the build's RUN step printed MARKER: the agent is mid-build."""
    async with asyncio.timeout(60):
        async for event in client.watch(build_id):
            if event.WhichOneof("event") == "log" and MARKER in event.log.line:
                return
            if event.WhichOneof("event") == "build":
                assert event.build.state not in (
                    common_pb2.BUILD_STATE_FAILED, common_pb2.BUILD_STATE_CANCELLED
                ), event.build  # fmt: skip


async def test_an_agent_follows_the_standby_to_the_active_and_keeps_its_job_across_a_takeover(
    tmp_path: Path, postgres_dsn: str, docker_available: str, registry: Registry,
    base_image: str, unique_repo: str,
) -> None:  # fmt: skip
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"ARG BASE\nFROM ${{BASE}}\nRUN echo {MARKER} && sleep 6 && echo done > /built\n"
    )
    with contextlib.ExitStack() as processes:
        first = processes.enter_context(coordinator(tmp_path, "c0", postgres_dsn))
        _, trust = await first_admin(first)
        second = processes.enter_context(coordinator(tmp_path, "c1", postgres_dsn))
        await assert_standby(second, first, trust)
        async with BuildClient(first.address, credentials=creds(trust)) as client:
            agent_token = (await client.create_token(trust_pb2.TOKEN_ROLE_AGENT)).token_text

        # the standby first: enrolment and the stream are both sent on to the active one
        agent, agent_log = start_agent(tmp_path, "ha-agent", agent_token, [second, first],
                                       docker_available)  # fmt: skip
        processes.callback(stop_process, agent)
        await poll_until(lambda: connected_agents(first, trust), timeout=30,
                         message="the agent connected to the active coordinator")  # fmt: skip
        log = agent_log.read_text()
        assert f"{second.address} is a standby: enrolling at the active one" in log, log
        assert f"connected to coordinator {agent_address(first)} as ha-agent" in log, log

        packed = pack_context(context)
        async with BuildClient(f"{first.address},{second.address}",
                               credentials=creds(trust)) as client:  # fmt: skip
            try:
                await client.upload_context(packed)
                submitted = await client.submit(
                    context_digest=packed.digest, dockerfile=packed.dockerfile,
                    platforms=["linux/amd64"], tags=[f"{registry.address}/{unique_repo}:ha"],
                    build_args={"BASE": base_image}, no_cache=True,  # the step must run
                )  # fmt: skip
            finally:
                packed.discard()
            build_id = submitted.build.id
            await wait_for_marker(client, build_id)
            before = await the_job(client, build_id)
            assert (before.state, before.attempt) == (common_pb2.JOB_STATE_RUNNING, 1), before

            first.proc.send_signal(signal.SIGKILL)  # mid-build: the RUN step sleeps
            killed = time.monotonic()
            first.proc.wait(10)
            moved = await poll_until(lambda: connected_agents(second, trust),
                                     timeout=TAKEOVER_LIMIT, interval=0.1,
                                     message="the agent connected to the new active")  # fmt: skip
            took = time.monotonic() - killed
            assert [(j.job_id, j.attempt) for j in moved[0].running] == [(before.id, 1)]
            print(f"\nagent on the new active {took:.2f} s after the SIGKILL")

            async def finished() -> build_pb2.Build | None:
                build = await client.retrying(lambda: client.get_build(build_id))
                return build if build.state == common_pb2.BUILD_STATE_SUCCEEDED else None

            done = await poll_until(finished, timeout=60, interval=0.25,
                                    message="the build finished on the new active")  # fmt: skip
        job = done.jobs[0]
        # the same attempt, never re-queued: the running build was re-attached, not redone
        assert (job.attempt, job.agent, list(job.requeue_reasons)) == (1, "ha-agent", []), job
        assert f"connected to coordinator {agent_address(second)} as ha-agent" in (
            agent_log.read_text()
        )
        assert agent.poll() is None, "the agent kept running through the takeover"

"""Two real coordinators on one PostgreSQL database: one active, one standby, and takeover."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psycopg

from polyarch.agent.enrolment import enrol
from polyarch.client.api import BuildClient
from polyarch.client.context import pack_context
from polyarch.client.credentials import Credentials
from polyarch.proto.trust import ClientTrust, aio_channel
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc, trust_pb2
from tests.support.farm import POLYARCH
from tests.support.ha_processes import (
    accepted,
    assert_standby,
    coordinator,
    first_admin,
    list_builds,
)
from tests.support.poll import poll_until
from tests.support.services import free_port

TAKEOVER_LIMIT = 15.0  # the bound, SIGKILL to the first accepted call
ROUNDS = 5
EXIT_DEMOTED = 4


async def submit(address: str, admin: str, context: Path) -> str:
    """A build for linux/amd64 (a connected agent must offer it); its id."""
    packed = pack_context(context)
    try:
        async with BuildClient(address, credentials=Credentials(token=admin)) as client:
            await client.upload_context(packed)
            submitted = await client.submit(
                context_digest=packed.digest, dockerfile=packed.dockerfile,
                platforms=["linux/amd64"], tags=["127.0.0.1:1/failover/test:kept"],
            )  # fmt: skip
    finally:
        packed.discard()
    return str(submitted.build.id)


@contextlib.asynccontextmanager
async def fake_agent(address: str, admin: str, name: str) -> AsyncIterator[None]:
    """An enrolled agent's stream offering linux/amd64 that never builds (no builder here:
    it only lets a submit be accepted and its build recorded)."""
    async with BuildClient(address, credentials=Credentials(token=admin)) as client:
        agent_token = (await client.create_token(trust_pb2.TOKEN_ROLE_AGENT)).token_text
    trust = await asyncio.to_thread(Credentials(token=agent_token).resolve, address)
    identity = await enrol(address, trust, name, False)
    outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
    await outbox.put(agent_pb2.AgentMessage(hello=agent_pb2.AgentHello(
        name=name, builder="probe", native_platforms=["linux/amd64"], slots=1)))  # fmt: skip

    async def requests() -> AsyncIterator[agent_pb2.AgentMessage]:
        while (message := await outbox.get()) is not None:
            yield message

    async with aio_channel(identity.agent_address, identity.trust()) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(requests())
        try:
            await asyncio.wait_for(call.read(), 10)  # the Welcome: connected
            yield
        finally:
            call.cancel()


async def test_the_standby_takes_over_from_a_killed_active_within_15_seconds(
    tmp_path: Path, postgres_dsn: str
) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\nCOPY Dockerfile /\n")
    with contextlib.ExitStack() as processes:
        first = processes.enter_context(coordinator(tmp_path, "c0", postgres_dsn))
        # the first one alone: it wins at start and writes the first admin token
        admin, trust = await first_admin(first)
        assert isinstance(await list_builds(first.address, trust), list)
        active, standby = first, processes.enter_context(coordinator(tmp_path, "c1", postgres_dsn))
        await assert_standby(standby, active, trust)
        unauthenticated = await list_builds(standby.address, ClientTrust(root_pem=trust.root_pem))
        assert isinstance(unauthenticated, grpc.aio.AioRpcError)  # no token: redirected too
        assert unauthenticated.code() == grpc.StatusCode.UNAVAILABLE
        async with fake_agent(active.address, admin, "probe-0"):
            kept = await submit(active.address, admin, context)

        takeovers: list[float] = []
        for round_ in range(ROUNDS):
            active.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            active.proc.wait(10)

            listed = await poll_until(
                functools.partial(accepted, standby, trust),
                timeout=TAKEOVER_LIMIT + 5, interval=0.05,
                message=f"round {round_}: the standby accepts calls",
            )  # fmt: skip
            takeovers.append(time.monotonic() - killed)
            assert kept in listed, f"round {round_}: {kept} lost in the takeover"
            assert takeovers[-1] < TAKEOVER_LIMIT, takeovers
            # the killed one comes back (as a supervisor restarts it): a standby now
            active, standby = (
                standby,
                processes.enter_context(coordinator(tmp_path, f"c{round_ + 2}", postgres_dsn)),
            )
            await assert_standby(standby, active, trust)

        print(
            f"\ntakeover SIGKILL -> first accepted call, {ROUNDS} rounds: median "
            f"{statistics.median(takeovers):.2f} s, max {max(takeovers):.2f} s "
            f"({', '.join(f'{t:.2f}' for t in takeovers)})"
        )
        # the last active accepts submits too, and a term per takeover was recorded
        async with fake_agent(active.address, admin, "probe-1"):
            assert await submit(active.address, admin, context)
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as db:
            row = await (await db.execute("SELECT epoch, holder FROM coordinator_term")).fetchone()
        assert row == (ROUNDS + 1, active.address)
        assert f"active for term {ROUNDS + 1}" in active.log()
        assert active.metric("polyarch_coordinator_failovers_total") == 1


async def test_an_active_whose_commit_is_fenced_exits_to_be_restarted(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """A term moved on behind the active's back (as after a partition): its next commit is
    fenced, it stops serving and exits with 4 for its supervisor to restart it."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\n")
    with coordinator(tmp_path, "c0", postgres_dsn) as active:
        admin, _ = await first_admin(active)
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as db:
            await db.execute("UPDATE coordinator_term SET epoch = epoch + 1")
        with contextlib.suppress(Exception):  # its writes fail: that is the point
            async with fake_agent(active.address, admin, "probe-0"):
                await submit(active.address, admin, context)
        await asyncio.to_thread(active.proc.wait, 20)
        assert active.proc.returncode == EXIT_DEMOTED, active.log()[-2000:]
        assert "a commit was fenced" in active.log()


async def test_clients_follow_a_standby_to_the_active_and_across_a_takeover(
    tmp_path: Path, postgres_dsn: str
) -> None:
    with contextlib.ExitStack() as processes:
        first = processes.enter_context(coordinator(tmp_path, "c0", postgres_dsn))
        admin, trust = await first_admin(first)
        second = processes.enter_context(coordinator(tmp_path, "c1", postgres_dsn))
        await assert_standby(second, first, trust)

        # the CLI pointed at the standby, or at a dead address then the standby: it follows
        dead = f"127.0.0.1:{free_port()}"
        env = {"PATH": "/usr/bin:/bin", "POLYARCH_TOKEN": admin, **pythonpath()}
        for given in (second.address, f"{dead},{second.address}"):
            done = await asyncio.to_thread(
                subprocess.run, [POLYARCH, "builds", "--json", "--coordinator", given],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, (given, done.stderr)

        # a client given both follows the takeover: the killed active's peer takes over
        lost: list[str] = []
        async with BuildClient(
            f"{first.address},{second.address}", credentials=Credentials(token=admin)
        ) as client:
            assert client.address == first.address
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
            builds = await client.retrying(client.list_builds, on_lost=lost.append)
            assert builds == [] and client.address == second.address
        assert len(lost) <= 1  # said at most once while the standby took over


def pythonpath() -> dict[str, str]:
    """A worktree's code for the CLI, as the coordinators run it (when PYTHONPATH is set)."""
    import os

    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}

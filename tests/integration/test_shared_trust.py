"""Two real coordinators on one PostgreSQL database share tokens, enrolments, drains and the CA."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psycopg
import pytest

from polyarch.agent.config import AgentConfig
from polyarch.agent.enrolment import Identity, enrol
from polyarch.agent.runtime import Agent
from polyarch.client.api import BuildClient, PolyarchError
from polyarch.client.credentials import Credentials
from polyarch.coordinator.config import CoordinatorConfig
from polyarch.coordinator.server import Coordinator
from polyarch.coordinator.trust.auth import Principal
from polyarch.proto.platforms import parse_platform
from polyarch.proto.trust import Role, parse_token
from polyarch.proto.v1 import fleet_pb2, trust_pb2
from tests.security.test_operator_pki import _key_pem, _pem, issue
from tests.support.poll import poll_until
from tests.support.postgres import PostgresServer
from tests.support.stand_in_builders import IdleBuilder

REVOCATION_DEADLINE = 1.5  # "within about a second"


def settings(data_dir: Path, dsn: str, **extra: object) -> CoordinatorConfig:
    return CoordinatorConfig(
        listen="127.0.0.1:0",
        agent_listen="127.0.0.1:0",
        data_dir=data_dir,
        metrics_listen="",
        database=dsn,
        # two coordinators serving at once, to see what they share: with the election one
        # would be a standby refusing every call (test_failover.py covers that)
        election=False,
        **extra,
    )  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def started(*configs: CoordinatorConfig) -> AsyncIterator[list[Coordinator]]:
    """The coordinators, started at once; stopped after."""
    coordinators = [Coordinator(config) for config in configs]
    try:
        await asyncio.gather(*(c.start() for c in coordinators))
        yield coordinators
    finally:
        for coordinator in coordinators:
            await coordinator.stop(grace=0)


def admin_token(*coordinators: Coordinator) -> str:
    """The first admin token, from whichever data dir it was written to (exactly one)."""
    files = [c.config.data_dir / "admin.token" for c in coordinators]
    written = [f for f in files if f.exists()]
    assert len(written) == 1, f"admin tokens written: {written}"
    return written[0].read_text().strip()


def client(coordinator: Coordinator, token: str) -> BuildClient:
    """The CLI's client, pinning the CA by the token (it dials to fetch and check it)."""
    return BuildClient(coordinator.address, credentials=Credentials(token=token))


async def create_token(coordinator: Coordinator, admin: str, role: trust_pb2.TokenRole) -> str:
    async with client(coordinator, admin) as api:
        return str((await api.create_token(role, description="shared-trust test")).token_text)


async def refused(coordinator: Coordinator, token: str) -> grpc.StatusCode | None:
    """None when a READ call with `token` succeeds, else its status code."""
    try:
        async with client(coordinator, token) as api:
            await api.list_builds()
    except PolyarchError as error:
        return error.code
    return None


async def database_rows(dsn: str, sql: str) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as db:
        return list(await (await db.execute(sql)).fetchall())


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


async def assert_no_secret_logged(
    logs: pytest.LogCaptureFixture, server: PostgresServer, dsn: str, tokens: list[str]
) -> None:
    """Neither a token's secret nor a line of the CA's key in our logs or the server's."""
    stored = await database_rows(dsn, "SELECT key_pem FROM certificate_authority")
    keys = [str(r[0]) for r in stored]
    key_lines = [line for key in keys for line in key.splitlines() if "-----" not in line]
    secrets = [parse_token(t).secret for t in tokens] + key_lines
    assert secrets, "nothing to look for"
    for text in (logs.text, server.log_path.read_text(errors="replace")):
        assert text, "no logs captured"
        leaked = [s[:8] for s in secrets if s in text]
        assert not leaked, f"secrets in the logs (first characters): {leaked}"


async def test_coordinators_started_at_once_agree_on_one_ca_and_one_admin_token(
    tmp_path: Path, postgres_dsn: str, postgres_server: PostgresServer,
    logs: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    configs = [settings(tmp_path / name, postgres_dsn) for name in ("a", "b")]
    async with started(*configs) as (a, b):
        assert a.server_tls is not None and b.server_tls is not None
        assert a.server_tls.ca_sha256 == b.server_tls.ca_sha256
        assert a.server_tls.server_cert_pem != b.server_tls.server_cert_pem  # each its own
        admin = admin_token(a, b)
        for coordinator in (a, b):  # pins the shared CA against both servers
            assert await refused(coordinator, admin) is None
            # the CA's key lives in the database only, never in a data dir
            assert not (coordinator.config.data_dir / "tls" / "ca-key.pem").exists()
        assert len(await database_rows(postgres_dsn, "SELECT 1 FROM certificate_authority")) == 1
        assert len(await database_rows(postgres_dsn, "SELECT id FROM tokens")) == 1
        assert not (tmp_path / "a" / "state.sqlite3").exists()  # no SQLite with --database
    await assert_no_secret_logged(logs, postgres_server, postgres_dsn, [admin])


async def test_a_token_made_on_one_works_on_the_other_until_revoked_on_the_first(
    tmp_path: Path, postgres_dsn: str, postgres_server: PostgresServer,
    logs: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    configs = [settings(tmp_path / name, postgres_dsn) for name in ("a", "b")]
    async with started(*configs) as (a, b):
        admin = admin_token(a, b)
        ci = await create_token(a, admin, trust_pb2.TOKEN_ROLE_CI)
        assert await poll_until(
            lambda: _accepted(b, ci), timeout=REVOCATION_DEADLINE,
            message="a token made on A authenticates on B",
        )  # fmt: skip
        token_id = parse_token(ci).token_id
        async with client(a, admin) as api:
            await api.revoke_token(token_id)
        revoked_at = time.monotonic()
        code = await poll_until(lambda: refused(b, ci), timeout=REVOCATION_DEADLINE,
                                message="B refuses the token A revoked")  # fmt: skip
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - revoked_at < REVOCATION_DEADLINE
        # B's in-memory revocation event fired too: its open streams end at once
        assert b.tokens is not None
        assert "revoked" in b.tokens.invalid_now(Principal(Role.CI, token_id=token_id))
    await assert_no_secret_logged(logs, postgres_server, postgres_dsn, [admin, ci])


async def _accepted(coordinator: Coordinator, token: str) -> bool:
    return await refused(coordinator, token) is None


@contextlib.asynccontextmanager
async def agent_on(
    coordinator: Coordinator, identity: Identity, work: Path
) -> AsyncIterator[Agent]:
    """A real agent under `identity`, on this coordinator's agent (mTLS) port."""
    config = AgentConfig(
        coordinator=coordinator.address, name=identity.name,
        native=[parse_platform("linux/amd64")], slots=1, work_dir=work, heartbeat_interval=1.0,
        trust=identity.trust(), channel_address=f"127.0.0.1:{coordinator.agent_port}",
    )  # fmt: skip
    agent = Agent(config, IdleBuilder())
    task = asyncio.create_task(agent.run(), name=f"agent-{identity.name}")
    try:
        await asyncio.wait_for(agent.connected.wait(), 15)
        yield agent
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)


async def agent_state(coordinator: Coordinator, admin: str, name: str) -> int | None:
    async with client(coordinator, admin) as api:
        found = [a.state for a in await api.list_agents() if a.name == name]
    return found[0] if found else None


async def test_an_agent_enrolled_through_one_is_accepted_by_the_other_and_drains_last(
    tmp_path: Path, postgres_dsn: str
) -> None:
    configs = [settings(tmp_path / name, postgres_dsn) for name in ("a", "b")]
    async with started(*configs) as (a, b):
        admin = admin_token(a, b)
        agent_token = await create_token(a, admin, trust_pb2.TOKEN_ROLE_AGENT)
        trust = await asyncio.to_thread(Credentials(token=agent_token).resolve, a.address)
        identity = await enrol(a.address, trust, "shared-1", replace=False)
        async with agent_on(a, identity, tmp_path / "agent"):
            async with client(a, admin) as api:
                drained = await api.drain_agent("shared-1")
            assert drained.state == fleet_pb2.AGENT_STATE_DRAINING
        await b.stop(grace=0)  # B restarts: it learns the drain from the database
        async with started(configs[1]) as (b_again,):
            assert "shared-1" in b_again.manager.roster.drained  # type: ignore[union-attr]
            # B never saw this agent enrol: its enrolment came through the database
            async with agent_on(b_again, identity, tmp_path / "agent"):
                state = await agent_state(b_again, admin, "shared-1")
                assert state == fleet_pb2.AGENT_STATE_DRAINING


async def test_an_upgraded_single_coordinator_keeps_its_tokens_and_its_ca(
    tmp_path: Path, postgres_dsn: str, postgres_server: PostgresServer,
    logs: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    alone = settings(tmp_path / "a", "")  # SQLite in its data dir, its own CA
    async with started(alone) as (single,):
        assert single.server_tls is not None
        pin = single.server_tls.ca_sha256
        admin = admin_token(single)
        ci = await create_token(single, admin, trust_pb2.TOKEN_ROLE_CI)
    upgraded = settings(tmp_path / "a", postgres_dsn)
    joining = settings(tmp_path / "b", postgres_dsn)
    # the upgraded one first: its state seeds the database, then another joins
    async with started(upgraded) as (a,), started(joining) as (b,):
        for coordinator in (a, b):
            assert coordinator.server_tls is not None
            assert coordinator.server_tls.ca_sha256 == pin  # every token's pin still holds
            assert await refused(coordinator, ci) is None
            assert await refused(coordinator, admin) is None
        assert admin_token(a, b) == admin  # the same file; nothing new was minted
    async with started(upgraded):  # a later start: the rows were carried in already
        pass
    assert "do not work here" not in logs.text
    ids = {str(r[0]) for r in await database_rows(postgres_dsn, "SELECT id FROM tokens")}
    assert ids == {parse_token(admin).token_id, parse_token(ci).token_id}
    assert "carried 2 tokens" in logs.text
    await assert_no_secret_logged(logs, postgres_server, postgres_dsn, [admin, ci])


async def test_an_operators_pki_is_given_to_both_and_nothing_is_stored(
    tmp_path: Path, postgres_dsn: str
) -> None:
    root = issue("Acme Root CA", None, ca=True)
    server = issue("farm.acme", root, server=True)
    files = {"chain": _pem(server[0]) + _pem(root[0]), "key": _key_pem(server[1]),
             "root": _pem(root[0])}  # fmt: skip
    for name, data in files.items():
        (tmp_path / f"{name}.pem").write_bytes(data)
    pki = {"tls_cert": tmp_path / "chain.pem", "tls_key": tmp_path / "key.pem",
           "tls_client_ca": tmp_path / "root.pem"}  # fmt: skip
    configs = [settings(tmp_path / name, postgres_dsn, **pki) for name in ("a", "b")]
    async with started(*configs) as (a, b):
        admin = admin_token(a, b)
        for coordinator in (a, b):
            assert await refused(coordinator, admin) is None
    assert await database_rows(postgres_dsn, "SELECT 1 FROM certificate_authority") == []


async def test_a_drain_outlives_a_restart_with_sqlite_too(tmp_path: Path) -> None:
    alone = settings(tmp_path / "a", "")
    async with started(alone) as (single,):
        admin = admin_token(single)
        agent_token = await create_token(single, admin, trust_pb2.TOKEN_ROLE_AGENT)
        trust = await asyncio.to_thread(Credentials(token=agent_token).resolve, single.address)
        identity = await enrol(single.address, trust, "solo-1", replace=False)
        async with agent_on(single, identity, tmp_path / "agent"), client(single, admin) as api:
            await api.drain_agent("solo-1")
    async with started(alone) as (again,), agent_on(again, identity, tmp_path / "agent"):
        assert await agent_state(again, admin, "solo-1") == fleet_pb2.AGENT_STATE_DRAINING
        async with client(again, admin) as api:
            await api.undrain_agent("solo-1")
    async with started(alone) as (third,):
        assert third.manager is not None and "solo-1" not in third.manager.roster.drained

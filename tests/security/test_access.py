"""Probes against a real TLS coordinator: transport, tokens, roles, agent identity, contexts.

Each probe asserts the exact gRPC status, and that the coordinator is still healthy after.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from polyarch.coordinator.trust.auth import METHOD_ACCESS
from polyarch.proto.trust import ClientTrust, Role, aio_channel
from polyarch.proto.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    build_pb2,
    build_pb2_grpc,
    common_pb2,
    fleet_pb2,
    fleet_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)
from tests.support.secure_farm import (
    SecureCoordinator,
    agent_stream,
    builds_json,
    healthy,
    running_secure_coordinator,
)

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCoordinator]:
    with running_secure_coordinator(tmp_path_factory.mktemp("secure")) as running:
        yield running


@pytest.fixture
async def after_each_probe(coordinator: SecureCoordinator) -> AsyncIterator[None]:
    yield
    assert await asyncio.to_thread(healthy, coordinator), coordinator.log()[-3000:]


# One cheap, valid-looking call per RPC a client may make (agent RPCs are probed apart).
def _calls(channel: grpc.aio.Channel) -> dict[str, object]:
    build = build_pb2_grpc.BuildServiceStub(channel)
    fleet = fleet_pb2_grpc.FleetServiceStub(channel)
    trust = trust_pb2_grpc.TrustServiceStub(channel)
    digest = "sha256:" + "0" * 64
    return {
        "/polyarch.v1.BuildService/StatContext": build.StatContext(
            build_pb2.StatContextRequest(digest=digest)
        ),
        "/polyarch.v1.BuildService/GetBuild": build.GetBuild(
            build_pb2.GetBuildRequest(build_id="nope")
        ),
        "/polyarch.v1.BuildService/ListBuilds": build.ListBuilds(build_pb2.ListBuildsRequest()),
        "/polyarch.v1.BuildService/SubmitBuild": build.SubmitBuild(
            build_pb2.SubmitBuildRequest(
                context_digest=digest, platforms=["linux/amd64"], tags=["127.0.0.1:1/a/b:c"]
            )
        ),
        "/polyarch.v1.BuildService/CancelBuild": build.CancelBuild(
            build_pb2.CancelBuildRequest(build_id="nope")
        ),
        "/polyarch.v1.FleetService/ListAgents": fleet.ListAgents(fleet_pb2.ListAgentsRequest()),
        "/polyarch.v1.FleetService/DrainAgent": fleet.DrainAgent(
            fleet_pb2.DrainAgentRequest(name="nope")
        ),
        "/polyarch.v1.FleetService/UndrainAgent": fleet.UndrainAgent(
            fleet_pb2.DrainAgentRequest(name="nope")
        ),
        "/polyarch.v1.TrustService/CreateToken": trust.CreateToken(
            trust_pb2.CreateTokenRequest(role=trust_pb2.TOKEN_ROLE_READ)
        ),
        "/polyarch.v1.TrustService/ListTokens": trust.ListTokens(trust_pb2.ListTokensRequest()),
        "/polyarch.v1.TrustService/RevokeToken": trust.RevokeToken(
            trust_pb2.RevokeTokenRequest(id="nope")
        ),
    }


async def _codes(coordinator: SecureCoordinator, token: str | None) -> dict[str, grpc.StatusCode]:
    codes = {}
    async with coordinator.channel(token) as channel:
        for method, call in _calls(channel).items():
            try:
                await call  # type: ignore[misc]
                codes[method] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                codes[method] = exc.code()
    return codes


DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.parametrize("role", [None, Role.AGENT, Role.READ, Role.CI, Role.ADMIN])
async def test_each_rpc_checks_the_role(
    coordinator: SecureCoordinator, role: Role | None, after_each_probe: None
) -> None:
    token = None if role is None else await coordinator.token(role)
    codes = await _codes(coordinator, token)
    for method, code in codes.items():
        required = METHOD_ACCESS[method]
        assert isinstance(required, Role)
        if role is None:
            assert code == grpc.StatusCode.UNAUTHENTICATED, method
        elif role.allows(required):
            assert code not in DENIED, f"{role.value} refused {method}: {code}"
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, f"{role.value} on {method}: {code}"


async def test_plaintext_and_a_foreign_ca_get_no_service(
    coordinator: SecureCoordinator, tmp_path: Path, after_each_probe: None
) -> None:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
                fleet_pb2.ListAgentsRequest(), timeout=5
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    from polyarch.coordinator.trust.pki import CertificateAuthority, server_names

    other = CertificateAuthority(tmp_path / "other").ensure(server_names([], []))
    trust = ClientTrust(root_pem=other.client_ca_pem, token=coordinator.admin_token)
    async with aio_channel(coordinator.address, trust) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
                fleet_pb2.ListAgentsRequest(), timeout=5
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "handshake failed" in (caught.value.details() or "").lower()


async def test_health_needs_no_token_and_reflection_does(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    async with coordinator.channel(None) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert METHOD_ACCESS["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"] in (
        Role.READ,
    )
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for token, want in ((None, grpc.StatusCode.UNAUTHENTICATED), ("read", grpc.StatusCode.OK)):
        presented = await coordinator.token(Role.READ) if token else None
        async with coordinator.channel(presented) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            # without a token nothing is sent: the refusal comes at the call's headers, and a
            # request racing it would fail on the client ("execute_batch", INTERNAL)
            stream = stub.ServerReflectionInfo(iter([request]) if token else None)
            try:
                reply = await stream.read()
                names = {s.name for s in reply.list_services_response.service}
                assert "polyarch.v1.BuildService" in names
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
        assert code == want


async def test_expired_and_revoked_tokens_are_refused_at_once(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    short = await coordinator.token(Role.READ, ttl=1)
    await asyncio.sleep(1.5)
    codes = await _codes(coordinator, short)
    assert codes["/polyarch.v1.FleetService/ListAgents"] == grpc.StatusCode.UNAUTHENTICATED

    # a revoked token on a stream already open: test_a_revoked_token_ends_a_watch_...
    ci = await coordinator.token(Role.CI)
    assert (await _codes(coordinator, ci))["/polyarch.v1.BuildService/ListBuilds"] not in DENIED
    revoke = coordinator.cli("token", "revoke", ci.split("_")[2])
    assert revoke.returncode == 0, revoke.stderr
    codes = await _codes(coordinator, ci)
    assert codes["/polyarch.v1.BuildService/ListBuilds"] == grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_token_ends_a_watch_that_is_already_open(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    """A watch on a real build (queued: no agent builds linux/s390x) ends when its token goes."""
    identity = await coordinator.enrol("s390x-probe")
    ci = await coordinator.token(Role.CI)
    context = b"probe"
    digest = "sha256:" + hashlib.sha256(context).hexdigest()
    async with agent_stream(coordinator, identity, native_platforms=["linux/s390x"]) as (_, call):
        await call.read()  # welcome
        async with coordinator.channel(ci) as channel:
            stub = build_pb2_grpc.BuildServiceStub(channel)
            await stub.UploadContext(
                iter([common_pb2.ContextChunk(digest=digest, size=len(context), data=context)])
            )
            submitted = await stub.SubmitBuild(
                build_pb2.SubmitBuildRequest(
                    context_digest=digest, platforms=["linux/s390x"], tags=["127.0.0.1:9/p/q:r"]
                )
            )
            watch = stub.WatchBuild(build_pb2.WatchBuildRequest(build_id=submitted.build.id))
            first = await watch.read()
            assert first.build.id == submitted.build.id
            revoke = coordinator.cli("token", "revoke", ci.split("_")[2])
            assert revoke.returncode == 0, revoke.stderr
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while await asyncio.wait_for(watch.read(), 10) is not grpc.aio.EOF:
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in (caught.value.details() or "")
    cancel = coordinator.cli("cancel", submitted.build.id)
    assert cancel.returncode == 0, cancel.stderr


async def test_agent_names_cannot_be_taken_over(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    victim = await coordinator.enrol("victim")
    async with agent_stream(coordinator, victim) as (_, call):
        welcome = await call.read()
        assert welcome.WhichOneof("message") == "welcome"

        # enrolling the same name again without --replace: refused, the live one untouched
        with pytest.raises(Exception, match="already enrolled") as caught:
            await coordinator.enrol("victim")
        assert "victim" in str(caught.value)

        # another agent's certificate cannot say hello as the victim
        thief = await coordinator.enrol("thief")
        async with agent_stream(coordinator, thief, hello_name="victim") as (_, stolen):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stolen.read()
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # the same certificate twice: the second stream is refused, the first stays
        async with agent_stream(coordinator, victim) as (_, second):
            with pytest.raises(grpc.aio.AioRpcError) as twice:
                await second.read()
        assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "already connected" in (twice.value.details() or "")
        listed = {a["name"]: a for a in builds_json_agents(coordinator)}
        assert listed["victim"]["state"] == "ready"

    # no client certificate at all on the agent port: no TLS session
    plain_tls = ClientTrust(root_pem=coordinator.ca_pem)
    async with aio_channel(coordinator.agent_address, plain_tls) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await (
                agent_pb2_grpc.AgentServiceStub(channel)
                .FetchContext(agent_pb2.FetchContextRequest(digest="sha256:" + "0" * 64))
                .read()
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    # a token, however strong, does not open the agent channel on the API port
    async with coordinator.channel(coordinator.admin_token) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as no_cert:
            await (
                agent_pb2_grpc.AgentServiceStub(channel)
                .FetchContext(agent_pb2.FetchContextRequest(digest="sha256:" + "0" * 64))
                .read()
            )
    assert no_cert.value.code() == grpc.StatusCode.UNAUTHENTICATED


def builds_json_agents(coordinator: SecureCoordinator) -> list[dict[str, object]]:
    import json

    done = coordinator.cli("agents", "--json")
    assert done.returncode == 0, done.stderr
    agents: list[dict[str, object]] = json.loads(done.stdout)
    return agents


async def test_a_replaced_enrolment_cuts_the_old_certificate_off(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    old = await coordinator.enrol("moved")
    async with agent_stream(coordinator, old) as (_, call):
        await call.read()
        new = await coordinator.enrol("moved", replace=True)
        # the coordinator ends the old stream at once (cleanly: the agent will reconnect)
        ended = await asyncio.wait_for(call.read(), 10)
        assert ended is grpc.aio.EOF
    # probed with a unary-request call: a refusal while a client is still writing a stream
    # can surface as INTERNAL in grpcio's asyncio client (grpc/grpc#36066)
    async with aio_channel(old.agent_address, old.trust()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await (
                agent_pb2_grpc.AgentServiceStub(channel)
                .FetchContext(agent_pb2.FetchContextRequest(digest="sha256:" + "0" * 64))
                .read()
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no longer enrolled" in (refused.value.details() or "")
    async with agent_stream(coordinator, new) as (_, fresh):
        assert (await fresh.read()).WhichOneof("message") == "welcome"


async def test_a_revoked_enrolment_ends_the_stream_and_refuses_the_certificate(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    """What `polyarch deploy uninstall` relies on: only an admin may revoke, and after it
    the agent's old certificate is refused, its live stream ended."""
    gone = await coordinator.enrol("gone")
    request = trust_pb2.RevokeEnrolmentRequest(name="gone")
    async with coordinator.channel(await coordinator.token(Role.CI)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await trust_pb2_grpc.TrustServiceStub(channel).RevokeEnrolment(request)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with agent_stream(coordinator, gone) as (_, call):
        await call.read()
        async with coordinator.channel(coordinator.admin_token) as channel:
            stub = trust_pb2_grpc.TrustServiceStub(channel)
            assert (await stub.RevokeEnrolment(request)).revoked
            assert not (await stub.RevokeEnrolment(request)).revoked  # nothing left to revoke
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
    async with aio_channel(gone.agent_address, gone.trust()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await (
                agent_pb2_grpc.AgentServiceStub(channel)
                .FetchContext(agent_pb2.FetchContextRequest(digest="sha256:" + "0" * 64))
                .read()
            )
    assert cut.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "its enrolment revoked" in (cut.value.details() or "")


async def test_fetch_context_needs_an_assignment_that_uses_it(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    context = b"secret context bytes"
    digest = "sha256:" + hashlib.sha256(context).hexdigest()
    async with coordinator.channel(await coordinator.token(Role.CI)) as channel:
        await build_pb2_grpc.BuildServiceStub(channel).UploadContext(
            iter([common_pb2.ContextChunk(digest=digest, size=len(context), data=context)])
        )
    nosy = await coordinator.enrol("nosy")
    async with aio_channel(nosy.agent_address, nosy.trust()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await (
                agent_pb2_grpc.AgentServiceStub(channel)
                .FetchContext(agent_pb2.FetchContextRequest(digest=digest))
                .read()
            )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_idempotency_keys_cannot_be_squatted(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    identity = await coordinator.enrol("squat-agent")
    context = b"squat"
    digest = "sha256:" + hashlib.sha256(context).hexdigest()

    def request(platform: str) -> build_pb2.SubmitBuildRequest:
        return build_pb2.SubmitBuildRequest(
            context_digest=digest, platforms=[platform], tags=["127.0.0.1:9/p/q:r"],
            idempotency_key="release-1",
        )  # fmt: skip

    async with agent_stream(
        coordinator, identity, native_platforms=["linux/ppc64le"], emulated_platforms=[]
    ) as (_, call):
        await call.read()
        first_token, other_token = (
            await coordinator.token(Role.CI),
            await coordinator.token(Role.CI),
        )
        async with coordinator.channel(first_token) as channel:
            stub = build_pb2_grpc.BuildServiceStub(channel)
            await stub.UploadContext(
                iter([common_pb2.ContextChunk(digest=digest, size=len(context), data=context)])
            )
            first = await stub.SubmitBuild(request("linux/ppc64le"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SubmitBuild(request("linux/ppc64le/other"))
            assert caught.value.code() in (
                grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT
            )  # fmt: skip
        async with coordinator.channel(other_token) as channel:
            stub = build_pb2_grpc.BuildServiceStub(channel)
            theirs = await stub.SubmitBuild(request("linux/ppc64le"))
        assert theirs.build.id != first.build.id and not theirs.existing
    for build in (first.build.id, theirs.build.id):
        assert coordinator.cli("cancel", build).returncode == 0


async def test_no_secret_reaches_logs_database_listing_or_metrics(
    coordinator: SecureCoordinator,
) -> None:
    # every role's token used once, a revoked one and a wrong secret, on top of earlier probes
    for role in Role:
        await _codes(coordinator, await coordinator.token(role))
    revoked = await coordinator.token(Role.CI)
    assert coordinator.cli("token", "revoke", revoked.split("_")[2]).returncode == 0
    await _codes(coordinator, revoked)
    await _codes(coordinator, revoked[:-8] + "00000000")
    await coordinator.enrol("grep-agent")
    haystacks = {
        "log": coordinator.log(),
        "metrics": coordinator.metrics(),
        "builds --json": str(builds_json(coordinator)),
    }
    with sqlite3.connect(coordinator.data_dir / "state.sqlite3") as db:
        haystacks["database"] = "\n".join(
            str(row) for table in ("tokens", "builds", "jobs", "enrolments")
            for row in db.execute(f"SELECT * FROM {table}")
        )  # fmt: skip
    assert len(coordinator.secrets_used) >= len(Role) + 2
    from prometheus_client.parser import text_string_to_metric_families

    refusals = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(haystacks["metrics"])
        if family.name == "polyarch_auth_refusals"
        for sample in family.samples
        if sample.name == "polyarch_auth_refusals_total"
    }
    assert refusals.get("unauthenticated", 0) >= 2 and refusals.get("forbidden", 0) >= 1
    for token in [*coordinator.secrets_used, coordinator.admin_token]:
        secret = token.split("_")[3]
        for where, text in haystacks.items():
            assert secret not in text, f"a token's secret is in the {where}"

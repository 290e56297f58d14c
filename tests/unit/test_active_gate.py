"""The standby's gate: each refusal names where that call goes (agents: the active's agent port)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from polyarch.coordinator.ha.candidacy import Candidacy
from polyarch.coordinator.ha.election import Term
from polyarch.coordinator.ha.gate import ActiveGate
from polyarch.proto.active_coordinator import ACTIVE_METADATA
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc, fleet_pb2, fleet_pb2_grpc
from tests.support.poll import poll_until

CLIENTS, AGENTS = "active.example:7600", "active.example:7601"


def standby_gate() -> ActiveGate:
    gate = ActiveGate()
    gate.holder, gate.agent_holder = CLIENTS, AGENTS
    return gate


def test_an_agent_call_is_sent_to_the_active_agent_port_every_other_call_to_its_api() -> None:
    gate = standby_gate()
    details, trailing = gate.refusal("/polyarch.v1.AgentService/Connect")
    assert trailing == ((ACTIVE_METADATA, AGENTS),) and AGENTS in details
    for method in ("/polyarch.v1.BuildService/Submit", "/polyarch.v1.TrustService/Enroll"):
        details, trailing = gate.refusal(method)
        assert trailing == ((ACTIVE_METADATA, CLIENTS),) and CLIENTS in details


def test_no_term_yet_or_a_closed_gate_names_nobody() -> None:
    assert ActiveGate().refusal("/polyarch.v1.AgentService/Connect")[1] == ()
    gate = standby_gate()
    gate.close("this coordinator stepped down (test)")
    details, trailing = gate.refusal("/polyarch.v1.AgentService/Connect")
    assert trailing == () and details.startswith("this coordinator stepped down (test)")


@pytest.fixture
async def standby_server() -> AsyncIterator[str]:
    """A server behind a standby's gate with the agent and fleet services; its address."""
    server = grpc.aio.server(interceptors=[standby_gate()])
    agent_pb2_grpc.add_AgentServiceServicer_to_server(agent_pb2_grpc.AgentServiceServicer(), server)
    fleet_pb2_grpc.add_FleetServiceServicer_to_server(fleet_pb2_grpc.FleetServiceServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_an_agent_stream_and_a_client_call_are_refused_with_their_own_target(
    standby_server: str,
) -> None:
    async def hello() -> AsyncIterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(hello=agent_pb2.AgentHello(name="a1"))

    async with grpc.aio.insecure_channel(standby_server) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in agent_pb2_grpc.AgentServiceStub(channel).Connect(hello(), timeout=5):
                pass
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
                fleet_pb2.ListAgentsRequest(), timeout=5
            )
    for refused, target in ((stream.value, AGENTS), (unary.value, CLIENTS)):
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(refused.trailing_metadata() or ()).get(ACTIVE_METADATA) == target


class StandingElection:
    """Never wins; each attempt reads the other coordinator's term, as Election.attempt does."""

    retry = 0.01

    def __init__(self, term: Term) -> None:
        self.term, self.seen = term, None
        self.resigned = False

    async def attempt(self) -> None:
        self.seen = self.term  # type: ignore[assignment]

    async def resign(self) -> None:
        self.resigned = True


async def test_a_standby_takes_both_addresses_of_the_active_from_the_term() -> None:
    gate, announced = ActiveGate(), []
    election = StandingElection(Term(3, CLIENTS, 0.0, agent_holder=AGENTS))

    async def announce(active: bool) -> None:
        announced.append(active)

    async def promote(_term: Any) -> None:
        raise AssertionError("a standby that never wins is never promoted")

    candidacy = Candidacy(election, gate, promote, announce)  # type: ignore[arg-type]
    await candidacy.start()
    try:
        await poll_until(lambda: gate.agent_holder, timeout=5, message="the agent holder set")
        assert (gate.holder, gate.agent_holder, gate.active) == (CLIENTS, AGENTS, False)
        assert announced == [False]
    finally:
        await candidacy.close()
    assert election.resigned

"""An agent's stream finds the active coordinator: past a dead address, through a standby."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from polyarch.agent.runtime import Agent, AgentConfig
from polyarch.coordinator.ha.gate import ActiveGate
from polyarch.proto.platforms import parse_platform
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc
from tests.support.poll import poll_until
from tests.support.services import free_port
from tests.unit.test_agent_assignments import HeldBuilder


class ActiveCoordinator(agent_pb2_grpc.AgentServiceServicer):
    """Welcomes every stream and records what comes over it; `drop` ends the current one."""

    def __init__(self) -> None:
        self.hellos: list[agent_pb2.AgentHello] = []
        self.received: list[agent_pb2.AgentMessage] = []
        self.drop = asyncio.Event()

    async def Connect(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        hello = await anext(aiter(request_iterator))
        self.hellos.append(hello.hello)
        yield agent_pb2.CoordinatorMessage(welcome=agent_pb2.Welcome(heartbeat_interval_ms=60_000))
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            await self.drop.wait()
        finally:
            reader.cancel()
        self.drop.clear()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the active coordinator went away")

    async def _read(self, requests: AsyncIterator[agent_pb2.AgentMessage]) -> None:
        async for message in requests:
            self.received.append(message)


async def serving(servicer: Any, *interceptors: Any) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=list(interceptors))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def sample(agent: Agent, name: str) -> float | None:
    return agent.metrics.registry.get_sample_value(name)


def results(messages: list[agent_pb2.AgentMessage]) -> list[str]:
    return [m.result.job_id for m in messages if m.WhichOneof("message") == "result"]


async def test_the_stream_follows_a_standby_to_the_active_one_and_comes_back_after_a_drop(
    tmp_path: Path,
) -> None:
    active = ActiveCoordinator()
    active_server, active_address = await serving(active)
    gate = ActiveGate()  # a standby whose term names the active's agent port (not listed)
    gate.holder, gate.agent_holder = "127.0.0.1:1", active_address
    standby_server, standby_address = await serving(agent_pb2_grpc.AgentServiceServicer(), gate)
    dead = f"127.0.0.1:{free_port()}"
    config = AgentConfig(
        coordinator=f"{dead},{standby_address}", name="a1", builder="docker",
        native=[parse_platform("linux/amd64")], emulated=[], work_dir=tmp_path / "agent",
        reconnect_max_delay=0.5,
    )  # fmt: skip
    agent = Agent(config, HeldBuilder())
    build = asyncio.create_task(asyncio.Event().wait())  # a job that keeps running throughout
    agent.jobs["b1-linux-amd64"] = (3, build)
    runner = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.connected.wait(), 10)
        assert agent.rotation.current == active_address
        assert [(r.job_id, r.attempt) for r in active.hellos[0].running] == [("b1-linux-amd64", 3)]

        # the active drops the stream; a result produced meanwhile goes out on the next one
        agent.connected.clear()
        active.drop.set()
        await poll_until(lambda: sample(agent, "polyarch_agent_connected") == 0, timeout=5,
                         interval=0.01, message="the agent saw the stream end")  # fmt: skip
        agent._send(agent_pb2.AgentMessage(result=agent_pb2.JobResult(job_id="done-1", ok=True)))
        await asyncio.wait_for(agent.connected.wait(), 10)
        assert len(active.hellos) == 2 and agent.rotation.current == active_address
        assert active.hellos[1].running[0].attempt == 3 and not build.done()
        await poll_until(lambda: results(active.received) == ["done-1"], timeout=5,
                         message="the result reached the active one")  # fmt: skip
        # streams after the first: standby, active; dead, standby, active again
        assert sample(agent, "polyarch_agent_reconnects_total") == 5
    finally:
        await agent.shutdown()
        await asyncio.wait_for(runner, 10)
        await active_server.stop(None)
        await standby_server.stop(None)

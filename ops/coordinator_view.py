"""What deploy asks the coordinator, through its API (never a log): fleet, drains, enrolments."""

from __future__ import annotations

import asyncio

from polyarch.client.api import BuildClient
from polyarch.ops.ssh import HostError
from polyarch.proto.v1 import fleet_pb2

CONNECTED = frozenset({fleet_pb2.AGENT_STATE_READY, fleet_pb2.AGENT_STATE_DRAINING})
POLL_SECONDS = 0.5


class CoordinatorView:
    """The deploying operator's client of the coordinator (an admin token: drains, revokes)."""

    def __init__(self, client: BuildClient) -> None:
        self.client = client

    async def agent(self, name: str) -> fleet_pb2.Agent | None:
        for agent in await self.client.list_agents():
            if agent.name == name:
                return agent
        return None

    async def connected(self, name: str) -> fleet_pb2.Agent | None:
        agent = await self.agent(name)
        return agent if agent is not None and agent.state in CONNECTED else None

    async def wait_connected(self, name: str, version: str, timeout: float) -> fleet_pb2.Agent:
        """Polls the fleet listing until `name` is connected running `version`."""
        deadline = asyncio.get_running_loop().time() + timeout
        seen = "not listed"
        while True:
            agent = await self.agent(name)
            if agent is not None:
                state = fleet_pb2.AgentState.Name(agent.state).removeprefix("AGENT_STATE_")
                seen = f"{state.lower()}, version {agent.version or '?'}"
                if agent.state in CONNECTED and agent.version == version:
                    return agent
            if asyncio.get_running_loop().time() > deadline:
                raise HostError(
                    f"{name}: not connected with version {version} within {timeout:g}s "
                    f"(the coordinator lists it as {seen})"
                )
            await asyncio.sleep(POLL_SECONDS)

    async def drain_and_wait(self, name: str, timeout: float) -> None:
        """Stops new jobs reaching `name`, then waits (bounded) until its running jobs end."""
        if await self.connected(name) is None:
            return  # nothing can be running there
        await self.client.drain_agent(name)
        deadline = asyncio.get_running_loop().time() + timeout
        while (agent := await self.agent(name)) is not None and agent.running:
            if asyncio.get_running_loop().time() > deadline:
                jobs = ", ".join(f"{j.build_id}/{j.platform}" for j in agent.running)
                raise HostError(f"{name}: still running {jobs} after {timeout:g}s of draining")
            await asyncio.sleep(POLL_SECONDS)

    async def undrain(self, name: str) -> None:
        if await self.agent(name) is not None:
            await self.client.undrain_agent(name)

    async def revoke(self, name: str) -> bool:
        return await self.client.revoke_enrolment(name)

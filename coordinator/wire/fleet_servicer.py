"""FleetService: agent listing, drain and undrain for operators and the CLI."""

from __future__ import annotations

from typing import Any

import grpc

from polyarch.coordinator.core.fleet import AgentSession
from polyarch.coordinator.core.manager import BuildManager
from polyarch.coordinator.wire import convert
from polyarch.coordinator.wire.errors import domain_errors
from polyarch.proto.v1 import fleet_pb2, fleet_pb2_grpc


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):
    def __init__(self, manager: BuildManager) -> None:
        self.manager = manager

    def _agent(self, session: AgentSession) -> fleet_pb2.Agent:
        running = self.manager.roster.running_jobs(session.name)
        return convert.agent_message(session, running)

    @domain_errors
    async def ListAgents(
        self, request: fleet_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fleet_pb2.ListAgentsResponse:
        sessions = sorted(self.manager.sessions.values(), key=lambda s: s.name)
        return fleet_pb2.ListAgentsResponse(agents=[self._agent(s) for s in sessions])

    @domain_errors
    async def DrainAgent(
        self, request: fleet_pb2.DrainAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fleet_pb2.Agent:
        return self._agent(self.manager.set_draining(request.name, True))

    @domain_errors
    async def UndrainAgent(
        self, request: fleet_pb2.DrainAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fleet_pb2.Agent:
        return self._agent(self.manager.set_draining(request.name, False))

"""Agents a coordinator expects back after a restart or a takeover, and what they build.

A coordinator records each agent's arrival and departure in its store. The next one to load
that store (the same process restarted, or a standby taking over) accepts submits for the
platforms of agents that were connected a moment ago, before they reconnect: the jobs queue
and run when the agents are back, instead of the submit being refused as unschedulable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from polyarch.coordinator.core.model import EmulationPolicy
from polyarch.proto.platforms import Platform


@dataclass(frozen=True)
class AgentPresence:
    """One agent's last arrival (`present`) or departure, and the platforms it offered."""

    name: str
    native: tuple[str, ...]
    emulated: tuple[str, ...]
    present: bool
    at: float  # when it arrived (present) or left


class ExpectedAgents:
    """The agents a new active coordinator waits for until `deadline` (its re-attach window):
    those its store records as connected, or as gone less than a lease ago."""

    def __init__(self, agents: Iterable[AgentPresence] = (), deadline: float = 0.0) -> None:
        self.deadline = deadline
        self._agents = {agent.name: agent for agent in agents}

    def arrived(self, name: str) -> None:
        """The agent is back (or a new stream by that name): it speaks for itself now."""
        self._agents.pop(name, None)

    def covers(self, platform: Platform, policy: EmulationPolicy, now: float) -> bool:
        """Whether an expected agent could build `platform` under `policy` (False once the
        window has passed)."""
        if now >= self.deadline:
            return False
        wanted = str(platform)
        for agent in self._agents.values():
            if wanted in agent.native:
                return True
            if policy is not EmulationPolicy.NEVER and wanted in agent.emulated:
                return True
        return False

    def expire(self, now: float) -> list[AgentPresence]:
        """Once the window has passed: the agents that never came back (forgotten now)."""
        if now < self.deadline or not self._agents:
            return []
        gone, self._agents = list(self._agents.values()), {}
        return gone

"""Connected agents: one session per agent stream, its outbox and liveness; fleet gauges."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from polyarch.coordinator.core.ledger import BuildLedger
from polyarch.coordinator.core.model import BuildSpec
from polyarch.coordinator.core.scheduler import Scheduler
from polyarch.coordinator.metrics import FleetSnapshot
from polyarch.coordinator.registry.build_credentials import BuildCredentials
from polyarch.proto.platforms import Platform


@dataclass(frozen=True)
class Hello:
    """An agent's first message: who it is, what it builds, and what it still runs."""

    name: str
    builder: str = ""
    version: str = ""
    native_platforms: tuple[str, ...] = ()
    emulated_platforms: tuple[str, ...] = ()
    slots: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    # (job id, attempt) of each attempt it still runs (after a reconnect)
    running: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Welcome:
    """The coordinator's answer to Hello: its version and how often to heartbeat."""

    coordinator_version: str
    heartbeat_interval: float


@dataclass(frozen=True)
class Assign:
    """Run one attempt of a job: everything the agent needs, credentials included."""

    build_id: str
    job_id: str
    attempt: int
    platform: str
    emulated: bool
    spec: BuildSpec
    push_tag: str
    credentials: BuildCredentials


@dataclass(frozen=True)
class Cancel:
    """Stop an attempt (the build was cancelled, or the attempt is no longer current)."""

    job_id: str
    attempt: int
    reason: str


AgentCommand = Welcome | Assign | Cancel


@dataclass(eq=False)
class AgentSession:
    """One live Connect stream. The servicer encodes `outbox` into the stream."""

    name: str
    builder: str
    version: str
    native: frozenset[Platform]
    emulated: frozenset[Platform]
    slots: int
    peer: str
    connected_at: float
    last_seen: float
    labels: dict[str, str] = field(default_factory=dict)
    draining: bool = False
    outbox: asyncio.Queue[AgentCommand | None] = field(default_factory=asyncio.Queue)
    closed: bool = False

    def send(self, command: AgentCommand) -> None:
        if not self.closed:
            self.outbox.put_nowait(command)

    def close(self) -> None:
        """Ends the stream: the servicer returns when it reads the sentinel."""
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(None)

    @property
    def architecture(self) -> str:
        natives = sorted(str(p.architecture) for p in self.native)
        return natives[0] if natives else "unknown"


def snapshot_fleet(
    sessions: Iterable[AgentSession], scheduler: Scheduler, ledger: BuildLedger
) -> FleetSnapshot:
    """The live numbers the Prometheus gauges report at scrape time."""
    agents: dict[tuple[str, str], int] = {}
    for session in sessions:
        key = ("draining" if session.draining else "ready", session.architecture)
        agents[key] = agents.get(key, 0) + 1
    builds = {state.value: n for state, n in ledger.unfinished_by_state.items() if n}
    return FleetSnapshot(
        queued_by_platform={str(p): n for p, n in scheduler.queued_by_platform().items()},
        agents_by_state=agents,
        slots={name: (view.slots, len(view.running)) for name, view in scheduler.agents.items()},
        builds_by_state=builds,
    )

"""Pure job placement: agents and queued jobs in, placements out (no I/O, no clock)."""

from __future__ import annotations

from dataclasses import dataclass, field

from polyarch.coordinator.core.model import EmulationPolicy, Mode
from polyarch.proto.platforms import Platform


@dataclass
class AgentView:
    """What the scheduler knows of one connected agent."""

    name: str
    native: frozenset[Platform]
    emulated: frozenset[Platform]
    slots: int
    running: set[str] = field(default_factory=set)
    draining: bool = False
    # repository -> placement sequence number of the last job it built there (warm cache)
    last_built: dict[str, int] = field(default_factory=dict)

    def mode_for(self, platform: Platform) -> Mode | None:
        if platform in self.native:
            return Mode.NATIVE
        if platform in self.emulated:
            return Mode.EMULATED
        return None

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.running)

    @property
    def load(self) -> float:
        return len(self.running) / self.slots if self.slots else 1.0


@dataclass
class QueuedJob:
    """A job waiting for an agent."""

    job_id: str
    build_id: str
    platform: Platform
    policy: EmulationPolicy
    repository: str
    # agents to avoid when another can take the job (the ones a retry failed on)
    avoid: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Placement:
    job_id: str
    agent: str
    mode: Mode


class Scheduler:
    """Decides which agent runs which job.

    Rules, in order: native before emulated (emulation only as the job's policy
    allows); a job of the build with the fewest running jobs first, so one large
    build cannot starve the others; then submission order. Among capable agents
    with a free slot: native first, then least loaded, then the one that built the
    same repository most recently (warm cache), then by name for determinism.
    """

    def __init__(self) -> None:
        self.agents: dict[str, AgentView] = {}
        self.queue: dict[str, QueuedJob] = {}  # insertion order = submission order
        self.running_by_build: dict[str, int] = {}
        self._job_agent: dict[str, str] = {}
        self._job_build: dict[str, str] = {}
        self._sequence = 0

    # ---- events -------------------------------------------------------------
    def add_agent(self, agent: AgentView) -> None:
        """An agent connected (or reconnected with the same name)."""
        previous = self.agents.get(agent.name)
        if previous is not None:
            agent.last_built = previous.last_built
        self.agents[agent.name] = agent
        for job_id in agent.running:
            self._job_agent[job_id] = agent.name

    def remove_agent(self, name: str) -> list[str]:
        """An agent left; returns the ids of the jobs it was running."""
        agent = self.agents.pop(name, None)
        if agent is None:
            return []
        lost = sorted(agent.running)
        for job_id in lost:
            self._forget_running(job_id)
        return lost

    def set_draining(self, name: str, draining: bool) -> None:
        self.agents[name].draining = draining

    def enqueue(self, job: QueuedJob) -> None:
        self.queue[job.job_id] = job
        self._job_build[job.job_id] = job.build_id

    def adopt_running(self, job_id: str, build_id: str, agent_name: str) -> None:
        """Records a job an agent reports it is already running (after a reconnect)."""
        self.queue.pop(job_id, None)
        self._job_build[job_id] = build_id
        self._job_agent[job_id] = agent_name
        self.agents[agent_name].running.add(job_id)
        self.running_by_build[build_id] = self.running_by_build.get(build_id, 0) + 1

    def release(self, job_id: str) -> None:
        """A job left its agent or the queue (finished, failed, cancelled)."""
        self.queue.pop(job_id, None)
        self._forget_running(job_id)
        self._job_build.pop(job_id, None)

    # ---- queries ------------------------------------------------------------
    def eligible_modes(self, platform: Platform, policy: EmulationPolicy) -> set[Mode]:
        """Modes in which a job may run right now, ignoring free slots and draining."""
        native = any(platform in a.native for a in self.agents.values())
        emulated = any(platform in a.emulated for a in self.agents.values())
        modes: set[Mode] = {Mode.NATIVE} if native else set()
        if emulated and (
            policy is EmulationPolicy.ALLOW or (policy is EmulationPolicy.FALLBACK and not native)
        ):
            modes.add(Mode.EMULATED)
        return modes

    def agent_of(self, job_id: str) -> str | None:
        return self._job_agent.get(job_id)

    def running_on(self, agent: str) -> list[str]:
        view = self.agents.get(agent)
        return sorted(view.running) if view else []

    def queued_by_platform(self) -> dict[Platform, int]:
        counts: dict[Platform, int] = {}
        for job in self.queue.values():
            counts[job.platform] = counts.get(job.platform, 0) + 1
        return counts

    # ---- decisions ----------------------------------------------------------
    def schedule(self) -> list[Placement]:
        """Places as many queued jobs as free slots allow; applies the placements."""
        placements: list[Placement] = []
        while True:
            best: tuple[tuple[int, int], QueuedJob, AgentView, Mode] | None = None
            for order, job in enumerate(self.queue.values()):
                key = (self.running_by_build.get(job.build_id, 0), order)
                if best is not None and key >= best[0]:
                    continue
                choice = self._pick_agent(job)
                if choice is not None:
                    best = (key, job, choice[0], choice[1])
            if best is None:
                return placements
            _, job, agent, mode = best
            self._apply(job, agent)
            placements.append(Placement(job.job_id, agent.name, mode))

    def _pick_agent(self, job: QueuedJob) -> tuple[AgentView, Mode] | None:
        allowed = self.eligible_modes(job.platform, job.policy)
        candidates: list[tuple[tuple[int, int, float, int, str], AgentView, Mode]] = []
        for agent in self.agents.values():
            mode = agent.mode_for(job.platform)
            if mode is None or mode not in allowed or agent.draining or agent.free_slots <= 0:
                continue
            key = (
                0 if mode is Mode.NATIVE else 1,
                1 if agent.name in job.avoid else 0,
                agent.load,
                -agent.last_built.get(job.repository, -1),
                agent.name,
            )
            candidates.append((key, agent, mode))
        if not candidates:
            return None
        _, agent, mode = min(candidates, key=lambda c: c[0])
        return agent, mode

    def _apply(self, job: QueuedJob, agent: AgentView) -> None:
        del self.queue[job.job_id]
        agent.running.add(job.job_id)
        self._sequence += 1
        agent.last_built[job.repository] = self._sequence
        self._job_agent[job.job_id] = agent.name
        self.running_by_build[job.build_id] = self.running_by_build.get(job.build_id, 0) + 1

    def _forget_running(self, job_id: str) -> None:
        name = self._job_agent.pop(job_id, None)
        if name is None:
            return
        agent = self.agents.get(name)
        if agent is not None:
            agent.running.discard(job_id)
        build_id = self._job_build.get(job_id)
        if build_id is not None and build_id in self.running_by_build:
            self.running_by_build[build_id] -= 1
            if self.running_by_build[build_id] <= 0:
                del self.running_by_build[build_id]

"""Pure, incremental job placement: agent and job events in, placements out (no I/O, no clock)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from polyarch.coordinator.core.model import EmulationPolicy, Mode
from polyarch.proto.platforms import Platform

# the jobs that can use the same agents: (platform, emulation policy)
_Class = tuple[Platform, EmulationPolicy]
# a free agent in one (platform, mode) pool: (load, last assigned, name, stamp)
_FreeEntry = tuple[float, int, str, int]
# a build's turn in one class: (running jobs of the build, submission number of its first job)
_TurnEntry = tuple[int, int, str]
# heaps are rebuilt when stale entries outnumber live ones by this much
_SLACK = 64


@dataclass
class AgentView:
    """What the scheduler knows of one connected agent."""

    name: str
    native: frozenset[Platform]
    emulated: frozenset[Platform]
    slots: int
    running: set[str] = field(default_factory=set)
    draining: bool = False
    # placement number of the last job assigned to it (0: none yet); spreads work
    last_assigned: int = 0

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

    Which job goes next: among queued jobs that some allowed agent has a free slot
    for, the one whose build has the fewest running jobs (so one large build cannot
    starve the others), then the earliest submitted.

    Which agent takes it: only connected, non-draining agents with a free slot
    (at most `slots` running each) that can build the platform in a mode the job's
    policy allows. NEVER: native only. FALLBACK: emulated only when no agent
    native for the platform is connected at all (a draining one counts: the job
    waits for it). ALLOW: either. Then, in order: native before emulated; not one
    in `avoid` (agents a retry failed on; soft, used when no other can take it);
    least loaded (running / slots); least recently assigned; name, for determinism.

    There is no warm-cache affinity on purpose: registry caches (cache_from /
    cache_to) are how the farm warms every agent, while sending a repository back
    to the agent that built it last piles quick jobs onto one agent and makes it a
    single point of failure. Least-recently-assigned spreads them over the fleet.

    Incremental: queued jobs live in one heap per class (platform, policy) of
    builds keyed by (running jobs, first submission), each build holding a heap of
    its own jobs; free agents live in one heap per (platform, mode). Entries are
    invalidated lazily (a build's entry by its running count and first job, an
    agent's by a stamp renewed on every change), so an event costs O(log n) and
    `schedule()` looks at one head per class and per pool, never the whole queue.
    After `schedule()` no queued job has an allowed agent with a free slot. An
    AgentView handed in is the scheduler's: change it only through these events.
    """

    def __init__(self) -> None:
        self.agents: dict[str, AgentView] = {}
        self.queue: dict[str, QueuedJob] = {}  # insertion order = submission order
        self.running_by_build: dict[str, int] = {}
        self._job_agent: dict[str, str] = {}
        self._job_build: dict[str, str] = {}
        self._sequence = 0  # placements made (AgentView.last_assigned)
        self._submitted = 0  # jobs enqueued (submission order)
        self._submission: dict[str, int] = {}  # queued job -> its submission number
        self._queued_count: dict[Platform, int] = {}
        self._native_count: dict[Platform, int] = {}
        self._emulated_count: dict[Platform, int] = {}
        self._waiting: dict[_Class, dict[str, list[tuple[int, str]]]] = {}
        self._turns: dict[_Class, list[_TurnEntry]] = {}
        self._build_classes: dict[str, set[_Class]] = {}
        self._pools: dict[tuple[Platform, Mode], set[str]] = {}
        self._free: dict[tuple[Platform, Mode], list[_FreeEntry]] = {}
        self._stamp: dict[str, int] = {}
        self._stamps = 0

    # ---- events -------------------------------------------------------------
    def add_agent(self, agent: AgentView) -> None:
        """An agent connected (or reconnected with the same name; its jobs stay on it)."""
        previous = self.agents.get(agent.name)
        given = set(agent.running)
        agent.running = set()
        if previous is not None:
            self._unregister(previous)
            agent.running = set(previous.running)
            agent.last_assigned = max(agent.last_assigned, previous.last_assigned)
        self.agents[agent.name] = agent
        for platform in agent.native:
            self._native_count[platform] = self._native_count.get(platform, 0) + 1
        for platform in agent.emulated:
            self._emulated_count[platform] = self._emulated_count.get(platform, 0) + 1
        for pool in self._pools_of(agent):
            self._pools.setdefault(pool, set()).add(agent.name)
        for job_id in sorted(given - agent.running):
            self._attach(job_id, self._job_build.get(job_id), agent)
        self._touch(agent)

    def remove_agent(self, name: str) -> list[str]:
        """An agent left; returns the ids of the jobs it was running."""
        agent = self.agents.get(name)
        if agent is None:
            return []
        self._unregister(agent)
        del self.agents[name]
        lost = sorted(agent.running)
        for job_id in lost:
            self._forget_running(job_id)
        return lost

    def set_draining(self, name: str, draining: bool) -> None:
        agent = self.agents[name]
        agent.draining = draining
        self._touch(agent)

    def enqueue(self, job: QueuedJob) -> None:
        """A job waits for an agent; one already queued keeps its place in line."""
        old = self.queue.get(job.job_id)
        if old is None:
            self._submitted += 1
            self._submission[job.job_id] = self._submitted
            self._queued_count[job.platform] = self._queued_count.get(job.platform, 0) + 1
        else:
            self._queued_count[old.platform] -= 1
            self._queued_count[job.platform] = self._queued_count.get(job.platform, 0) + 1
        self.queue[job.job_id] = job
        self._job_build[job.job_id] = job.build_id
        if old is not None:
            self._trim((old.platform, old.policy), old.build_id)
        cls = (job.platform, job.policy)
        builds = self._waiting.setdefault(cls, {})
        mine = builds.setdefault(job.build_id, [])
        entry = (self._submission[job.job_id], job.job_id)
        heapq.heappush(mine, entry)
        self._build_classes.setdefault(job.build_id, set()).add(cls)
        if mine[0] == entry:
            self._push_turn(cls, job.build_id)

    def adopt_running(self, job_id: str, build_id: str, agent_name: str) -> None:
        """Records a job an agent reports it is already running (after a reconnect)."""
        agent = self.agents[agent_name]
        self._attach(job_id, build_id, agent)
        self._touch(agent)

    def release(self, job_id: str) -> None:
        """A job left its agent or the queue (finished, failed, cancelled)."""
        if job_id in self.queue:
            self._dequeue(job_id)
        self._forget_running(job_id)
        self._job_build.pop(job_id, None)

    # ---- queries ------------------------------------------------------------
    def eligible_modes(self, platform: Platform, policy: EmulationPolicy) -> set[Mode]:
        """Modes in which a job may run right now, ignoring free slots and draining."""
        native = self._native_count.get(platform, 0) > 0
        modes: set[Mode] = {Mode.NATIVE} if native else set()
        if self._emulated_count.get(platform, 0) > 0 and self._may_emulate(platform, policy):
            modes.add(Mode.EMULATED)
        return modes

    def agent_of(self, job_id: str) -> str | None:
        return self._job_agent.get(job_id)

    def running_on(self, agent: str) -> list[str]:
        view = self.agents.get(agent)
        return sorted(view.running) if view else []

    def queued_by_platform(self) -> dict[Platform, int]:
        return {p: n for p, n in self._queued_count.items() if n > 0}

    # ---- decisions ----------------------------------------------------------
    def schedule(self) -> list[Placement]:
        """Places as many queued jobs as free slots allow; applies the placements."""
        placements: list[Placement] = []
        while True:
            best: tuple[tuple[int, int], _Class, str] | None = None
            for cls in list(self._turns):
                turn = self._next_turn(cls)
                if turn is None or (best is not None and turn[:2] >= best[0]):
                    continue
                if self._best_free(cls[0], Mode.NATIVE, frozenset()) is not None or (
                    self._may_emulate(*cls)
                    and self._best_free(cls[0], Mode.EMULATED, frozenset()) is not None
                ):
                    best = (turn[:2], cls, turn[2])
            if best is None:
                return placements
            _, (platform, policy), build_id = best
            job = self.queue[self._waiting[(platform, policy)][build_id][0][1]]
            for mode in (Mode.NATIVE, Mode.EMULATED):
                if mode is Mode.EMULATED and not self._may_emulate(platform, policy):
                    break
                agent = self._best_free(platform, mode, job.avoid)
                if agent is not None:
                    self._place(job, agent)
                    placements.append(Placement(job.job_id, agent.name, mode))
                    break

    # ---- queue bookkeeping --------------------------------------------------
    def _may_emulate(self, platform: Platform, policy: EmulationPolicy) -> bool:
        if policy is EmulationPolicy.ALLOW:
            return True
        return policy is EmulationPolicy.FALLBACK and self._native_count.get(platform, 0) == 0

    def _dequeue(self, job_id: str) -> None:
        job = self.queue.pop(job_id)
        del self._submission[job_id]
        self._queued_count[job.platform] -= 1
        self._trim((job.platform, job.policy), job.build_id)

    def _trim(self, cls: _Class, build_id: str) -> None:
        """Drops departed jobs off the top of a build's heap; a new head gets a turn."""
        builds = self._waiting.get(cls)
        mine = builds.get(build_id) if builds is not None else None
        if builds is None or mine is None:
            return
        changed = False
        while mine and not self._still_waiting(mine[0], cls, build_id):
            heapq.heappop(mine)
            changed = True
        if not mine:
            del builds[build_id]
            self._build_classes[build_id].discard(cls)
            if not self._build_classes[build_id]:
                del self._build_classes[build_id]
            if not builds:
                del self._waiting[cls]
                self._turns.pop(cls, None)
        elif changed:
            self._push_turn(cls, build_id)

    def _still_waiting(self, entry: tuple[int, str], cls: _Class, build_id: str) -> bool:
        job = self.queue.get(entry[1])
        return (
            job is not None
            and self._submission[entry[1]] == entry[0]
            and (job.platform, job.policy) == cls
            and job.build_id == build_id
        )

    def _push_turn(self, cls: _Class, build_id: str) -> None:
        builds = self._waiting[cls]
        turns = self._turns.setdefault(cls, [])
        if len(turns) > 2 * len(builds) + _SLACK:
            turns[:] = [(self.running_by_build.get(b, 0), h[0][0], b) for b, h in builds.items()]
            heapq.heapify(turns)
        else:
            first = builds[build_id][0][0]
            heapq.heappush(turns, (self.running_by_build.get(build_id, 0), first, build_id))

    def _next_turn(self, cls: _Class) -> _TurnEntry | None:
        turns = self._turns[cls]
        builds = self._waiting[cls]
        while turns:
            running, first, build_id = turns[0]
            mine = builds.get(build_id)
            if (
                mine is not None
                and mine[0][0] == first
                and self.running_by_build.get(build_id, 0) == running
            ):
                return turns[0]
            heapq.heappop(turns)
        return None

    def _running_changed(self, build_id: str, delta: int) -> None:
        count = self.running_by_build.get(build_id, 0) + delta
        if count > 0:
            self.running_by_build[build_id] = count
        else:
            self.running_by_build.pop(build_id, None)
        for cls in self._build_classes.get(build_id, ()):
            self._push_turn(cls, build_id)

    # ---- agent bookkeeping --------------------------------------------------
    @staticmethod
    def _pools_of(agent: AgentView) -> list[tuple[Platform, Mode]]:
        pools = [(p, Mode.NATIVE) for p in agent.native]
        return pools + [(p, Mode.EMULATED) for p in agent.emulated - agent.native]

    def _unregister(self, agent: AgentView) -> None:
        for platform in agent.native:
            self._native_count[platform] -= 1
        for platform in agent.emulated:
            self._emulated_count[platform] -= 1
        for pool in self._pools_of(agent):
            self._pools[pool].discard(agent.name)
        self._stamp.pop(agent.name, None)

    def _touch(self, agent: AgentView) -> None:
        """The agent changed: old heap entries go stale; it re-enters the pools if free."""
        self._stamps += 1
        self._stamp[agent.name] = self._stamps
        if agent.draining or agent.free_slots <= 0:
            return
        entry = (agent.load, agent.last_assigned, agent.name, self._stamps)
        for pool in self._pools_of(agent):
            free = self._free.setdefault(pool, [])
            if len(free) > 2 * len(self._pools[pool]) + _SLACK:
                free[:] = [e for e in free if self._stamp.get(e[2]) == e[3]]
                heapq.heapify(free)
            heapq.heappush(free, entry)

    def _best_free(self, platform: Platform, mode: Mode, avoid: frozenset[str]) -> AgentView | None:
        """The best free agent of a pool, one not in `avoid` if there is any."""
        free = self._free.get((platform, mode))
        if not free:
            return None
        skipped: list[_FreeEntry] = []
        found: _FreeEntry | None = None
        while free:
            entry = free[0]
            if self._stamp.get(entry[2]) != entry[3]:
                heapq.heappop(free)
            elif entry[2] in avoid:
                skipped.append(heapq.heappop(free))
            else:
                found = entry
                break
        for entry in skipped:
            heapq.heappush(free, entry)
        if found is None and skipped:
            found = skipped[0]
        return self.agents[found[2]] if found is not None else None

    # ---- applying decisions -------------------------------------------------
    def _place(self, job: QueuedJob, agent: AgentView) -> None:
        self._dequeue(job.job_id)
        agent.running.add(job.job_id)
        self._sequence += 1
        agent.last_assigned = self._sequence
        self._job_agent[job.job_id] = agent.name
        self._touch(agent)
        self._running_changed(job.build_id, +1)

    def _attach(self, job_id: str, build_id: str | None, agent: AgentView) -> None:
        """Records `job_id` as running on `agent` (taking it out of the queue)."""
        if job_id in self.queue:
            self._dequeue(job_id)
        self._forget_running(job_id)
        self._job_agent[job_id] = agent.name
        agent.running.add(job_id)
        if build_id is not None:
            self._job_build[job_id] = build_id
            self._running_changed(build_id, +1)

    def _forget_running(self, job_id: str) -> None:
        name = self._job_agent.pop(job_id, None)
        if name is None:
            return
        agent = self.agents.get(name)
        if agent is not None and job_id in agent.running:
            agent.running.discard(job_id)
            self._touch(agent)
        build_id = self._job_build.get(job_id)
        if build_id is not None and build_id in self.running_by_build:
            self._running_changed(build_id, -1)

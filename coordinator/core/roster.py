"""The agent side of the manager: sessions, drains, re-attach after restarts, and fencing."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from polyarch.coordinator.core.fleet import AgentSession, Cancel, Hello, Welcome, snapshot_fleet
from polyarch.coordinator.core.ledger import BuildLedger
from polyarch.coordinator.core.model import (
    AlreadyExists,
    BuildRecord,
    EmulationPolicy,
    InvalidRequest,
    JobRecord,
    JobState,
    Mode,
    NotFound,
)
from polyarch.coordinator.core.presence import AgentPresence, ExpectedAgents
from polyarch.coordinator.core.scheduler import AgentView, QueuedJob, Scheduler
from polyarch.coordinator.core.timeouts import ON_AGENT
from polyarch.coordinator.metrics import CoordinatorMetrics
from polyarch.proto.agent_protocol import DEFAULT_HEARTBEAT_INTERVAL, MAX_AGENT_SLOTS
from polyarch.proto.platforms import Platform, PlatformError, parse_platform
from polyarch.proto.registries import polyarch_version
from polyarch.proto.trust import NAME_PATTERN

if TYPE_CHECKING:
    from polyarch.coordinator.trust.store import TrustStore

log = logging.getLogger(__name__)


class Roster:
    """Which agents are connected, what each runs, and which messages are current."""

    def __init__(
        self, ledger: BuildLedger, metrics: CoordinatorMetrics, clock: Callable[[], float]
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.clock = clock
        self.scheduler = Scheduler()
        self.sessions: dict[str, AgentSession] = {}
        # names an operator drained: the drain survives the agent reconnecting, and with a
        # store (keep_drains) the coordinator restarting too
        self.drained: set[str] = set()
        self._drain_store: TrustStore | None = None
        # what Welcome tells agents; the server sets it from its lease (agent_timeout / 3)
        self.heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        # recovered jobs that were on an agent -> when to stop waiting for it to reconnect
        self.orphans: dict[str, float] = {}
        # agents connected to the coordinator before this one (a restart, a takeover): their
        # platforms are schedulable until the re-attach window ends
        self.expected = ExpectedAgents()

    def attach(self, hello: Hello, peer: str) -> AgentSession:
        """Registers a connected agent. A name holds one live stream: a second is refused
        (AlreadyExists) until the first ends or its lease expires."""
        if not NAME_PATTERN.match(hello.name):
            raise InvalidRequest(
                f"invalid agent name {hello.name!r}: letters, digits, '.', '_' and '-' only"
            )
        try:
            native = frozenset(parse_platform(p) for p in hello.native_platforms)
            emulated = frozenset(parse_platform(p) for p in hello.emulated_platforms) - native
        except PlatformError as exc:
            raise InvalidRequest(f"agent {hello.name}: {exc}") from None
        if not 1 <= hello.slots <= MAX_AGENT_SLOTS:
            # an agent claiming a thousand slots would draw the whole queue to itself
            raise InvalidRequest(
                f"agent {hello.name}: slots must be between 1 and {MAX_AGENT_SLOTS}"
            )
        old = self.sessions.get(hello.name)
        if old is not None:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(old.connected_at))
            raise AlreadyExists(
                f"agent {hello.name} is already connected (since {since} from {old.peer}); "
                "a second stream for one name is refused"
            )
        now = self.clock()
        session = AgentSession(
            name=hello.name, builder=hello.builder, version=hello.version, native=native,
            emulated=emulated, slots=hello.slots, peer=peer, connected_at=now, last_seen=now,
            labels=dict(hello.labels), draining=hello.name in self.drained,
        )  # fmt: skip
        self.sessions[hello.name] = session
        self.scheduler.add_agent(
            AgentView(hello.name, native, emulated, hello.slots, draining=session.draining)
        )
        session.send(Welcome(polyarch_version(), self.heartbeat_interval))
        self._adopt(session, hello.running)
        self.expected.arrived(hello.name)
        self._record_presence(session, present=True)
        self.publish_fleet()
        log.info("agent %s connected from %s (native %s, emulated %s)", hello.name, peer,
                 sorted(map(str, native)), sorted(map(str, emulated)))  # fmt: skip
        return session

    def detach(self, session: AgentSession) -> list[str]:
        """Forgets an agent whose stream ended; returns the ids of the jobs it was running
        (none if a newer stream of the same name already replaced it)."""
        session.close()
        if self.sessions.get(session.name) is not session:
            return []
        del self.sessions[session.name]
        lost = self.scheduler.remove_agent(session.name)
        self._record_presence(session, present=False)
        log.info("agent %s disconnected", session.name)
        self.publish_fleet()
        return lost

    def keep_drains(self, store: TrustStore) -> None:
        """Drains become durable: the store's are loaded now, and later ones written through
        (before memory changes, so a failed write leaves both as they were)."""
        self._drain_store = store
        self.drained = set(store.drained_agents())

    def set_draining(self, name: str, draining: bool, remember: bool) -> AgentSession:
        session = self.sessions.get(name)
        if session is None:
            raise NotFound(f"no connected agent named {name!r}")
        if remember and self._drain_store is not None:
            self._drain_store.set_drained(name, draining, self.clock())
        if remember:
            if draining:
                self.drained.add(name)
            else:
                self.drained.discard(name)
        session.draining = draining
        self.scheduler.set_draining(name, draining)
        return session

    def heartbeat(self, session: AgentSession) -> None:
        session.last_seen = self.clock()

    def close(self) -> None:
        for session in list(self.sessions.values()):
            session.close()

    # ---- jobs and agents ------------------------------------------------------------------
    def enqueue(self, build: BuildRecord, job: JobRecord, avoid: str = "") -> None:
        self.scheduler.enqueue(
            QueuedJob(
                job_id=job.id, build_id=build.id, platform=parse_platform(job.platform),
                policy=build.spec.emulation, repository=build.spec.repository,
                avoid=frozenset({avoid}) if avoid else frozenset(),
            )
        )  # fmt: skip

    def running_jobs(self, agent: str) -> list[JobRecord]:
        """The non-terminal jobs currently assigned to an agent."""
        found = (self.ledger.find_job(job_id) for job_id in self.scheduler.running_on(agent))
        return [f[1] for f in found if f is not None]

    def candidates(self, platform: Platform, policy: EmulationPolicy) -> list[AgentSession]:
        """The connected agents a job of this platform may run on under its policy."""
        modes = self.scheduler.eligible_modes(platform, policy)
        return [
            s for s in self.sessions.values()
            if (Mode.NATIVE in modes and platform in s.native)
            or (Mode.EMULATED in modes and platform in s.emulated)
        ]  # fmt: skip

    def jobs_on_agents(self) -> list[tuple[BuildRecord, JobRecord]]:
        """Every live attempt an agent holds: bounded by the fleet's slots, not the queue."""
        found = (
            self.ledger.find_job(job_id)
            for name in self.sessions
            for job_id in self.scheduler.running_on(name)
        )
        return [f for f in found if f is not None and f[1].state in ON_AGENT]

    def may_fetch_context(self, agent: str, digest: str) -> bool:
        """True when `agent` holds a current assignment whose build uses context `digest`."""
        for job_id in self.scheduler.running_on(agent):
            found = self.ledger.find_job(job_id)
            if found and found[1].agent == agent and found[0].spec.context_digest == digest:
                return True
        return False

    def _record_presence(self, session: AgentSession, present: bool) -> None:
        native, emulated = (tuple(sorted(map(str, p))) for p in (session.native, session.emulated))
        self.ledger.record_presence(
            AgentPresence(session.name, native, emulated, present, self.clock())
        )

    def expired_orphans(self) -> list[tuple[BuildRecord, JobRecord]]:
        """Recovered jobs whose agent did not return in time (forgotten as they are returned);
        expected agents that did not return are recorded as gone."""
        now, expired = self.clock(), []
        for gone in self.expected.expire(now):
            log.info("agent %s did not return after the restart or takeover", gone.name)
            self.ledger.record_presence(dataclasses.replace(gone, present=False, at=now))
        for job_id, deadline in list(self.orphans.items()):
            found = self.ledger.find_job(job_id)
            if found is None or found[1].state not in ON_AGENT:
                del self.orphans[job_id]
            elif now >= deadline:
                del self.orphans[job_id]
                expired.append(found)
        return expired

    def current(
        self, agent: str, job_id: str, attempt: int, kind: str
    ) -> tuple[BuildRecord, JobRecord] | None:
        """Fencing: the job a message is about, or None (counted) if the message comes from
        an attempt that is no longer current."""
        found = self.ledger.find_job(job_id)
        if found is None or found[1].state.terminal or found[1].state is JobState.QUEUED:
            self.metrics.stale_messages.labels(kind=kind).inc()
            return None
        if (found[1].agent, found[1].attempt) != (agent, attempt):
            self.metrics.stale_messages.labels(kind=kind).inc()
            return None
        return found

    def _adopt(self, session: AgentSession, running: tuple[tuple[str, int], ...]) -> None:
        """Re-attaches jobs an agent says it still runs, if they are still its to run."""
        for job_id, attempt in running:
            found = self.ledger.find_job(job_id)
            if found is None:
                continue
            build, job = found
            current = job.agent == session.name and job.attempt == attempt
            if current and job.state in (JobState.ASSIGNED, JobState.RUNNING, JobState.QUEUED):
                # the same attempt still runs there: take it back rather than start over
                self.orphans.pop(job.id, None)
                self.scheduler.adopt_running(job.id, build.id, session.name)
                if job.state is JobState.QUEUED:
                    self.ledger.move_job(
                        build, job, JobState.RUNNING, f"re-attached to {session.name}"
                    )
                log.info("job %s attempt %d re-attached to %s", job.id, attempt, session.name)
            else:
                session.send(Cancel(job_id, attempt, "attempt is no longer current"))

    # ---- metrics ------------------------------------------------------------------------
    def publish_fleet(self) -> None:
        """Hands the metrics a fresh snapshot (the watchdog does, every tick, and agents'
        arrivals and departures do)."""
        self.metrics.publish_fleet(snapshot_fleet(self.sessions.values(), self.scheduler,
                                                  self.ledger))  # fmt: skip

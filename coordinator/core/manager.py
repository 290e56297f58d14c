"""The build manager: turns submissions and agent events into persisted state and decisions."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from polyarch.coordinator.contexts.store import ContextStore
from polyarch.coordinator.core.completion import Completion, Publisher
from polyarch.coordinator.core.events import EventHub
from polyarch.coordinator.core.fleet import AgentSession, snapshot_fleet
from polyarch.coordinator.core.ledger import BuildLedger
from polyarch.coordinator.core.model import (
    AlreadyExists,
    BuildRecord,
    BuildSpec,
    BuildState,
    InvalidRequest,
    JobRecord,
    JobState,
    LimitExceeded,
    Mode,
    NotFound,
    PermissionDenied,
    Unschedulable,
    push_tag,
    request_hash,
)
from polyarch.coordinator.core.scheduler import AgentView, QueuedJob, Scheduler
from polyarch.coordinator.core.store import DuplicateIdempotencyKey, StateStore
from polyarch.coordinator.core.timeouts import AttemptClock, timeout_reason
from polyarch.coordinator.core.validation import describe_unschedulable, validate_spec
from polyarch.coordinator.limits import Limits
from polyarch.coordinator.metrics import CoordinatorMetrics, FleetSnapshot
from polyarch.coordinator.registry.build_credentials import BuildCredentials, CredentialVault
from polyarch.coordinator.wire import convert
from polyarch.proto.platforms import Platform, PlatformError, parse_platform
from polyarch.proto.registries import polyarch_version
from polyarch.proto.trust import NAME_PATTERN
from polyarch.proto.v1 import agent_pb2, build_pb2, common_pb2

log = logging.getLogger(__name__)

# A job whose agent vanished is tried this many times in all before it fails.
MAX_ATTEMPTS = 3
MAX_AGENT_SLOTS = 64
# Agents heartbeat this often (told in Welcome); a lease is three missed heartbeats.
LEASE_HEARTBEATS = 3
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# What an agent may report having pushed: one platform's image manifest.
IMAGE_MANIFEST_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    }
)


def describe_malformed_result(result: agent_pb2.JobResult) -> str:
    """Why a successful result cannot be taken as it is ("" when it can)."""
    if not _DIGEST.match(result.digest):
        return f"a malformed digest {result.digest[:80]!r} (want sha256:<64 hex>)"
    if result.size <= 0:
        return f"a manifest size of {result.size}"
    if result.media_type not in IMAGE_MANIFEST_TYPES:
        return f"an unknown manifest media type {result.media_type[:80]!r}"
    return ""


@dataclass(frozen=True)
class AgentEvent:
    """Who sent a message: fencing compares it with the job's current assignment."""

    agent: str
    job_id: str
    attempt: int


class BuildManager:
    """Owns builds, jobs and agent sessions; every change is stored before it is announced."""

    def __init__(
        self,
        store: StateStore,
        contexts: ContextStore,
        publisher: Publisher,
        metrics: CoordinatorMetrics,
        clock: Callable[[], float] = time.time,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.store = store
        self.contexts = contexts
        self.publisher = publisher
        self.metrics = metrics
        self.clock = clock
        self.scheduler = Scheduler()
        self.sessions: dict[str, AgentSession] = {}
        # names an operator drained: the drain survives the agent reconnecting
        self.drained: set[str] = set()
        self.hub = EventHub(self.limits)
        self.ledger = BuildLedger(store, self.hub, metrics, clock)
        # what Welcome tells agents; the server sets it from its lease (agent_timeout / 3)
        self.heartbeat_interval = 3.0
        # per-build registry credentials and secrets: memory only, gone when the build ends
        self.vault = CredentialVault()
        self.ledger.on_finished.append(self.vault.drop)
        self.completion = Completion(self.ledger, publisher, metrics, self.vault.get)
        # recovered jobs that were on an agent -> when to stop waiting for it to reconnect
        self._orphans: dict[str, float] = {}
        self._attempts = AttemptClock()
        metrics.watch_fleet()

    # ---- lifecycle ----------------------------------------------------------
    def recover(self, reattach_grace: float) -> None:
        """Reloads unfinished work after a restart.

        Queued jobs go back in the queue. Jobs that were on an agent wait up to
        `reattach_grace` seconds for that agent to reconnect and report them
        (see expire_orphans); builds whose jobs were all pushed are assembled again.
        """
        deadline = self.clock() + reattach_grace
        for build in self.store.unfinished_builds():
            jobs = self.store.jobs_of(build.id)
            self.ledger.track(build, jobs)
            if build.spec.secret_ids:
                self._fail_for_lost_secrets(build, jobs)
                continue
            for job in jobs:
                if job.state in (JobState.ASSIGNED, JobState.RUNNING):
                    self._orphans[job.id] = deadline
                elif job.state is JobState.QUEUED:
                    self._enqueue(build, job)
            self.completion.check(build)
        self.dispatch()

    def _fail_for_lost_secrets(self, build: BuildRecord, jobs: list[JobRecord]) -> None:
        """Secrets live in memory only: after a restart the build cannot go on."""
        reason = (
            "the coordinator restarted, and this build's secrets "
            f"({', '.join(build.spec.secret_ids)}) were held in memory only: resubmit it"
        )
        for job in jobs:
            if not job.state.terminal:
                job.error, job.failed_step = reason, "restart"
                self.ledger.set_job(build, job, JobState.FAILED, reason)
        self.ledger.finish(build, BuildState.FAILED, reason)

    def expire_orphans(self) -> None:
        """Re-queues recovered jobs whose agent did not come back to claim them in time."""
        now = self.clock()
        for job_id, deadline in list(self._orphans.items()):
            found = self.ledger.find_job(job_id)
            if found is None or found[1].state not in (JobState.ASSIGNED, JobState.RUNNING):
                del self._orphans[job_id]
            elif now >= deadline:
                del self._orphans[job_id]
                build, job = found
                reason = f"agent {job.agent} did not return after a restart"
                self._requeue(build, job, reason, kind="restart")
        self.dispatch()

    def expire_overdue_jobs(self) -> None:
        """Cancels, on their agents, attempts without a result after job_timeout_seconds and
        re-queues them as infrastructure failures (counted against MAX_ATTEMPTS); a late
        result of such an attempt is stale and ignored. Driven by the lease watchdog."""
        limit = self.limits.job_timeout_seconds
        live = [(b, j) for b, jobs in self.ledger.active() for j in jobs]
        for build, job in self._attempts.overdue(live, self.clock(), limit):
            reason, agent = timeout_reason(limit), job.agent
            if agent in self.sessions:
                self.sessions[agent].send(agent_pb2.CoordinatorMessage(
                    cancel=agent_pb2.CancelJob(job_id=job.id, attempt=job.attempt,
                                               reason=reason)))  # fmt: skip
            log.warning("job %s attempt %d on %s: %s", job.id, job.attempt, agent, reason)
            self._requeue(build, job, f"{reason} on {agent}", avoid=agent, kind="infrastructure")
        self.dispatch()

    async def close(self) -> None:
        await self.completion.close()
        for session in list(self.sessions.values()):
            session.close()

    # ---- client API ---------------------------------------------------------
    def submit(
        self,
        spec: BuildSpec,
        idempotency_key: str,
        owner: str = "",
        credentials: BuildCredentials | None = None,
    ) -> tuple[BuildRecord, bool]:
        """Validates and records a build; returns it and whether it already existed.

        An idempotency key belongs to its owner (the submitting token) and to one request:
        the same key with a different request raises AlreadyExists naming the first build.
        `credentials` stay in memory (the vault) for the assigned agents and the assembly;
        a retried submit brings them again, e.g. after a coordinator restart."""
        credentials = credentials or BuildCredentials()
        spec.secret_ids = sorted(credentials.secrets)
        spec.credential_registries = sorted(credentials.registry_auths)
        wanted = request_hash(spec)
        key = f"{owner}/{idempotency_key}" if idempotency_key else ""
        if key:
            existing = self.store.find_by_idempotency_key(key)
            if existing is not None:
                found = self._same_request(existing, wanted, idempotency_key)
                if self.ledger.is_active(found.id):
                    self.vault.put(found.id, credentials)
                return found, True
        platforms = self._validate(spec)
        now = self.clock()
        build = BuildRecord(
            id=uuid.uuid4().hex[:16], spec=spec, created_at=now, idempotency_key=key,
            owner=owner, request_hash=wanted,
        )  # fmt: skip
        jobs = {
            job.id: job
            for job in (
                JobRecord(
                    id=f"{build.id}-{p.slug}", build_id=build.id, platform=str(p), queued_at=now
                )
                for p in platforms
            )
        }
        try:
            self.store.create_build(build, list(jobs.values()))
        except DuplicateIdempotencyKey as dup:
            first = self.store.get_build(dup.build_id)
            assert first is not None
            return self._same_request(first, wanted, idempotency_key), True
        self.metrics.builds_submitted.inc()
        self.vault.put(build.id, credentials)
        self.ledger.track(build, list(jobs.values()))
        for job in jobs.values():
            self.metrics.job_transitions.labels(state=JobState.QUEUED.value).inc()
            self._enqueue(build, job)
        self.dispatch()
        return build, False

    @staticmethod
    def _same_request(existing: BuildRecord, wanted: str, key: str) -> BuildRecord:
        if existing.request_hash and existing.request_hash != wanted:
            raise AlreadyExists(
                f"idempotency key {key!r} already belongs to build {existing.id}, "
                "which asked for something else; use a new key for a new request"
            )
        return existing

    def may_cancel(self, build_id: str, token_id: str, is_admin: bool) -> None:
        """Raises PermissionDenied unless the caller submitted the build or is an admin."""
        build, _ = self.get(build_id)
        if not is_admin and build.owner != token_id:
            raise PermissionDenied(f"build {build_id} was submitted by another token")

    def get(self, build_id: str) -> tuple[BuildRecord, list[JobRecord]]:
        return self.ledger.get(build_id)

    def list_builds(self, limit: int) -> list[tuple[BuildRecord, list[JobRecord]]]:
        return [self.get(b.id) for b in self.store.list_builds(limit)]

    def cancel(self, build_id: str, reason: str) -> None:
        build, jobs = self.get(build_id)
        if build.state.terminal or not self.ledger.is_active(build_id):
            return
        self.completion.cancel(build_id)
        for job in jobs:
            if job.state.terminal:
                continue
            agent = self.scheduler.agent_of(job.id)
            if agent in self.sessions:
                self.sessions[agent].send(
                    agent_pb2.CoordinatorMessage(
                        cancel=agent_pb2.CancelJob(
                            job_id=job.id, attempt=job.attempt, reason=reason
                        )
                    )
                )
            self.scheduler.release(job.id)
            job.error = reason
            self.ledger.set_job(build, job, JobState.CANCELLED, reason)
        self.ledger.finish(build, BuildState.CANCELLED, reason or "cancelled")

    async def watch(self, build_id: str, log_tail: int) -> AsyncIterator[build_pb2.BuildEvent]:
        """The build's snapshot, replayed log lines, then live events until the build ends."""
        queue = self.hub.subscribe(build_id)
        try:
            build, jobs = self.get(build_id)
            yield build_pb2.BuildEvent(build=convert.build_message(build, jobs))
            for job in jobs:
                for line in self.hub.log_tail(job.id, log_tail):
                    yield build_pb2.BuildEvent(log=line)
            if build.state.terminal:
                return
            while (event := await queue.get()) is not None:
                yield event
            if queue.cut_off:
                raise LimitExceeded(queue.cut_off)
        finally:
            self.hub.unsubscribe(build_id, queue)

    # ---- agent API ----------------------------------------------------------
    def attach_agent(self, hello: agent_pb2.AgentHello, peer: str) -> AgentSession:
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
        self._adopt(session, hello.running)
        self.publish_fleet()
        session.send(
            agent_pb2.CoordinatorMessage(
                welcome=agent_pb2.Welcome(
                    coordinator_version=polyarch_version(),
                    heartbeat_interval_ms=int(self.heartbeat_interval * 1000),
                )
            )
        )
        log.info("agent %s connected from %s (native %s, emulated %s)", hello.name, peer,
                 sorted(map(str, native)), sorted(map(str, emulated)))  # fmt: skip
        self.dispatch()
        return session

    def may_fetch_context(self, agent: str, digest: str) -> bool:
        """True when `agent` holds a current assignment whose build uses context `digest`."""
        view = self.scheduler.agents.get(agent)
        for job_id in view.running if view is not None else ():
            found = self.ledger.find_job(job_id)
            build, job = found if found is not None else (None, None)
            if build and job and job.agent == agent and build.spec.context_digest == digest:
                return True
        return False

    def disconnect_agent(self, name: str, reason: str) -> None:
        """Ends the live stream of agent `name`, if any (its jobs go back to the queue)."""
        session = self.sessions.get(name)
        if session is not None:
            self.detach_agent(session, reason)

    def detach_agent(
        self, session: AgentSession, reason: str, keep: set[tuple[str, int]] | None = None
    ) -> None:
        """The agent's stream ended: its running jobs go back to the queue, except those
        in `keep` (job id, attempt), which its new stream reports it still runs."""
        session.close()
        if self.sessions.get(session.name) is not session:
            return
        del self.sessions[session.name]
        for job_id in self.scheduler.remove_agent(session.name):
            found = self.ledger.find_job(job_id)
            if found is not None and (job_id, found[1].attempt) not in (keep or set()):
                self._requeue(found[0], found[1], f"agent {session.name} {reason}",
                              avoid=session.name)  # fmt: skip
        log.info("agent %s disconnected: %s", session.name, reason)
        self.dispatch()
        self.publish_fleet()

    def running_jobs(self, agent: str) -> list[JobRecord]:
        """The non-terminal jobs currently assigned to an agent."""
        found = (self.ledger.find_job(job_id) for job_id in self.scheduler.running_on(agent))
        return [f[1] for f in found if f is not None]

    def heartbeat(self, session: AgentSession) -> None:
        session.last_seen = self.clock()

    def set_draining(self, name: str, draining: bool, remember: bool = True) -> AgentSession:
        """Stops (or resumes) assigning to an agent; `remember` keeps it across reconnects."""
        session = self.sessions.get(name)
        if session is None:
            raise NotFound(f"no connected agent named {name!r}")
        if remember:
            if draining:
                self.drained.add(name)
            else:
                self.drained.discard(name)
        session.draining = draining
        self.scheduler.set_draining(name, draining)
        if not draining:
            self.dispatch()
        return session

    def job_started(self, event: AgentEvent) -> None:
        found = self._current(event, "started")
        if found is not None:
            build, job = found
            job.started_at = self.clock()
            self.ledger.set_job(build, job, JobState.RUNNING, f"started on {event.agent}")

    def job_log(self, event: AgentEvent, lines: list[str]) -> None:
        found = self._current(event, "log")
        if found is None:
            return
        build, job = found
        for line in lines:
            self.hub.publish(
                build.id,
                build_pb2.BuildEvent(
                    log=build_pb2.LogLine(
                        job_id=job.id, platform=job.platform, attempt=job.attempt, line=line
                    )
                ),
            )

    def job_result(self, event: AgentEvent, result: agent_pb2.JobResult) -> None:
        found = self._current(event, "result")
        if found is None:
            return
        build, job = found
        self.scheduler.release(job.id)
        job.finished_at = self.clock()
        mode = job.mode.value if job.mode else "unknown"
        if job.started_at is not None:
            self.metrics.job_duration.labels(platform=job.platform, mode=mode).observe(
                job.finished_at - job.started_at
            )
        malformed = describe_malformed_result(result) if result.ok else ""
        if malformed and job.attempt < MAX_ATTEMPTS:
            self._requeue(build, job, f"agent {event.agent} reported {malformed}",
                          avoid=event.agent, kind="infrastructure")  # fmt: skip
            outcome = "retried"
        elif malformed:
            job.error, job.failed_step = f"agent {event.agent} reported {malformed}", "push"
            self.ledger.set_job(build, job, JobState.FAILED, job.error)
            outcome = "failed"
        elif result.ok:
            job.digest, job.size, job.media_type = result.digest, result.size, result.media_type
            self.ledger.set_job(build, job, JobState.PUSHED, f"pushed {result.digest}")
            outcome = "pushed"
        elif result.infrastructure_error and job.attempt < MAX_ATTEMPTS:
            self._requeue(build, job, f"{result.failed_step or 'build'} on {event.agent}: "
                          f"{result.error}", avoid=event.agent, kind="infrastructure")  # fmt: skip
            outcome = "retried"
        else:
            job.error, job.failed_step = result.error, result.failed_step
            self.ledger.set_job(build, job, JobState.FAILED, result.error)
            outcome = "failed"
        # counts attempts: result="retried" is an attempt whose job went back to the queue
        self.metrics.jobs_finished.labels(platform=job.platform, mode=mode, result=outcome).inc()
        self.completion.check(build)
        self.dispatch()

    # ---- scheduling ---------------------------------------------------------
    def dispatch(self) -> None:
        """Asks the scheduler for placements and sends them to the agents."""
        for placement in self.scheduler.schedule():
            found = self.ledger.find_job(placement.job_id)
            session = self.sessions.get(placement.agent)
            if found is None or session is None:
                self.scheduler.release(placement.job_id)
                continue
            build, job = found
            now = self.clock()
            self.metrics.queue_wait.labels(platform=job.platform).observe(now - job.queued_at)
            job.attempt += 1
            job.agent, job.mode = placement.agent, placement.mode
            job.started_at = job.finished_at = None
            job.error = job.failed_step = ""
            self.ledger.set_job(build, job, JobState.ASSIGNED,
                          f"assigned to {placement.agent} ({placement.mode.value})")  # fmt: skip
            if build.state is BuildState.QUEUED:
                self.ledger.set_build(build, BuildState.RUNNING)
            session.send(agent_pb2.CoordinatorMessage(assign=self._assignment(build, job)))

    def _assignment(self, build: BuildRecord, job: JobRecord) -> agent_pb2.Assignment:
        spec = build.spec
        own = self.vault.get(build.id) or BuildCredentials()
        return agent_pb2.Assignment(
            registry_auths=[
                common_pb2.RegistryAuth(registry=r, username=c.username, password=c.password)
                for r, c in sorted(own.registry_auths.items())
            ],
            secrets=[common_pb2.BuildSecret(id=i, value=v) for i, v in sorted(own.secrets.items())],
            job_id=job.id, attempt=job.attempt, build_id=build.id, platform=job.platform,
            mode=convert.MODES[job.mode or Mode.NATIVE], context_digest=spec.context_digest,
            dockerfile=spec.dockerfile, build_args=spec.build_args, target=spec.target,
            labels=spec.labels, repository=f"{spec.registry}/{spec.repository}",
            push_tag=push_tag(build.id, job.platform, job.attempt),
            cache_from=spec.cache_from, cache_to=spec.cache_to,
        )  # fmt: skip

    def _enqueue(self, build: BuildRecord, job: JobRecord, avoid: str = "") -> None:
        self.scheduler.enqueue(
            QueuedJob(
                job_id=job.id, build_id=build.id, platform=parse_platform(job.platform),
                policy=build.spec.emulation, repository=build.spec.repository,
                avoid=frozenset({avoid}) if avoid else frozenset(),
            )
        )  # fmt: skip

    def _requeue(
        self, build: BuildRecord, job: JobRecord, reason: str, avoid: str = "",
        kind: str = "agent_lost",
    ) -> None:  # fmt: skip
        """Puts a job back in the queue (kind labels the metric), or fails it when out of tries."""
        self.scheduler.release(job.id)
        job.requeue_reasons.append(reason)
        self.metrics.requeues.labels(reason=kind).inc()
        if job.attempt >= MAX_ATTEMPTS:
            job.error = f"gave up after {job.attempt} attempts; last: {reason}"
            job.finished_at = self.clock()
            self.ledger.set_job(build, job, JobState.FAILED, reason)
            self.completion.check(build)
            return
        job.queued_at = self.clock()
        # job.agent stays: it names the last agent, which may reconnect and re-attach the attempt
        self.ledger.set_job(build, job, JobState.QUEUED, reason)
        self._enqueue(build, job, avoid)

    def _adopt(self, session: AgentSession, running: Iterable[agent_pb2.RunningJob]) -> None:
        """Re-attaches jobs an agent says it still runs, if they are still its to run."""
        for item in running:
            found = self.ledger.find_job(item.job_id)
            if found is None:
                continue
            build, job = found
            current = job.agent == session.name and job.attempt == item.attempt
            if current and job.state in (JobState.ASSIGNED, JobState.RUNNING, JobState.QUEUED):
                # the same attempt still runs there: take it back rather than start over
                self._orphans.pop(job.id, None)
                self.scheduler.adopt_running(job.id, build.id, session.name)
                if job.state is JobState.QUEUED:
                    self.ledger.set_job(
                        build, job, JobState.RUNNING, f"re-attached to {session.name}"
                    )
                log.info("job %s attempt %d re-attached to %s", job.id, job.attempt, session.name)
            else:
                session.send(agent_pb2.CoordinatorMessage(
                    cancel=agent_pb2.CancelJob(job_id=item.job_id, attempt=item.attempt,
                                               reason="attempt is no longer current")))  # fmt: skip

    # ---- fencing and checks ---------------------------------------------------
    def _current(self, event: AgentEvent, kind: str) -> tuple[BuildRecord, JobRecord] | None:
        """The job a message is about, or None (counted) if the message is from a stale attempt."""
        found = self.ledger.find_job(event.job_id)
        if found is None or found[1].state.terminal or found[1].state is JobState.QUEUED:
            self.metrics.stale_messages.labels(kind=kind).inc()
            return None
        if (found[1].agent, found[1].attempt) != (event.agent, event.attempt):
            self.metrics.stale_messages.labels(kind=kind).inc()
            return None
        return found

    def _validate(self, spec: BuildSpec) -> list[Platform]:
        """Checks a submission; fills in the registry and repository its tags share."""
        platforms = validate_spec(spec, self.contexts, self.limits)
        unschedulable = [
            p for p in platforms if not self.scheduler.eligible_modes(p, spec.emulation)
        ]
        if unschedulable:
            raise Unschedulable(
                describe_unschedulable(unschedulable, spec.emulation, self.sessions)
            )
        return platforms

    def fleet_snapshot(self) -> FleetSnapshot:
        return snapshot_fleet(self.sessions.values(), self.scheduler, self.ledger)

    def publish_fleet(self) -> None:
        """Hands the metrics a fresh snapshot (the watchdog does, every tick, and agents'
        arrivals and departures do)."""
        self.metrics.publish_fleet(self.fleet_snapshot())

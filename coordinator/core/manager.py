"""The build manager: turns submissions and agent events into state changes and decisions."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from polyarch.coordinator.contexts.store import ContextStore
from polyarch.coordinator.core.completion import Completion, Publisher
from polyarch.coordinator.core.dispatch import Dispatcher
from polyarch.coordinator.core.events import BuildChanged, BuildEvent, EventHub, LogLine
from polyarch.coordinator.core.fleet import AgentSession, Cancel, Hello
from polyarch.coordinator.core.ledger import BuildLedger
from polyarch.coordinator.core.model import (
    AlreadyExists,
    BuildRecord,
    BuildSpec,
    BuildState,
    JobRecord,
    JobState,
    LimitExceeded,
    PermissionDenied,
    Unschedulable,
    request_hash,
)
from polyarch.coordinator.core.presence import ExpectedAgents
from polyarch.coordinator.core.roster import Roster
from polyarch.coordinator.core.states import (
    JobOutcome,
    RetryKind,
    Verdict,
    after_lost_attempt,
    gave_up,
    judge,
)
from polyarch.coordinator.core.store import DuplicateIdempotencyKey, StateStore, StoreError
from polyarch.coordinator.core.timeouts import AttemptClock, timeout_reason
from polyarch.coordinator.core.validation import (
    describe_unschedulable,
    refuse_unhonoured_caches,
    validate_spec,
)
from polyarch.coordinator.limits import Limits
from polyarch.coordinator.metrics import CoordinatorMetrics
from polyarch.coordinator.registry.build_credentials import (
    BuildCredentials,
    CredentialVault,
    client_for,
)
from polyarch.coordinator.registry.client import RegistryClient
from polyarch.coordinator.registry.gate import SupplyChainGate
from polyarch.proto.platforms import Platform

log = logging.getLogger(__name__)

# how many of the newest builds the immutable-tag check at submit looks through for an
# earlier build of the same request (whose identical rebuild may push the same digest)
_SAME_REQUEST_WINDOW = 1000


class BuildManager:
    """Owns builds, jobs and agent sessions. State changes go through the ledger (checked by
    the state machine in states.py, stored, then announced); placements through the
    dispatcher task; the agent side (sessions, drains, re-attach) through the roster."""

    def __init__(
        self,
        store: StateStore,
        contexts: ContextStore,
        publisher: Publisher,
        metrics: CoordinatorMetrics,
        clock: Callable[[], float] = time.time,
        limits: Limits | None = None,
        scratch_repository: str = "",
        gate: SupplyChainGate | None = None,
        registry: RegistryClient | None = None,
    ) -> None:
        self.limits = limits or Limits()
        # where builds that publish no tag push their images (validation._scratch)
        self.scratch_repository = scratch_repository
        # the supply-chain policy's submit checks, against the registry (registry/gate.py)
        self.gate = gate or SupplyChainGate()
        self.registry = registry
        self.store = store
        self.contexts = contexts
        self.metrics = metrics
        self.clock = clock
        self.hub = EventHub(self.limits)
        self.ledger = BuildLedger(store, self.hub, metrics, clock)
        # per-build registry credentials and secrets: memory only, gone when the build ends
        self.vault = CredentialVault()
        self.ledger.on_finished.append(self.vault.drop)
        self.completion = Completion(self.ledger, publisher, metrics, self.vault.get)
        self.roster = Roster(self.ledger, metrics, clock)
        self.scheduler = self.roster.scheduler
        self.sessions = self.roster.sessions
        self.dispatcher = Dispatcher(
            self.scheduler, self.ledger, self.sessions, metrics, self.vault.get, clock
        )
        self._attempts = AttemptClock()
        metrics.watch_fleet()

    @property
    def heartbeat_interval(self) -> float:
        return self.roster.heartbeat_interval

    @heartbeat_interval.setter
    def heartbeat_interval(self, seconds: float) -> None:
        self.roster.heartbeat_interval = seconds

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self, reattach_grace: float = 0.0) -> None:
        """Reloads unfinished work after a restart, then starts dispatching.

        Queued jobs go back in the queue. Jobs that were on an agent wait up to
        `reattach_grace` seconds for that agent to reconnect and report them (the roster's
        orphans); builds whose jobs were all pushed are assembled again."""
        unfinished = await self.store.unfinished_builds()
        jobs_of = await self.store.jobs_of_many([b.id for b in unfinished])
        now = self.clock()
        deadline = now + reattach_grace
        if reattach_grace > 0:
            expected = await self.store.agents_present(since=now - reattach_grace)
            self.roster.expected = ExpectedAgents(expected, deadline)
        for build in unfinished:
            jobs = jobs_of.get(build.id, [])
            self.ledger.track(build, jobs)
            lost = self._lost_on_restart(build, jobs)
            if lost:
                self._fail_unrecoverable(build, jobs, lost)
                continue
            for job in jobs:
                if job.state in (JobState.ASSIGNED, JobState.RUNNING):
                    self.roster.orphans[job.id] = deadline
                elif job.state is JobState.QUEUED:
                    self.enqueue(build, job)
            self.completion.check(build)
        self.dispatcher.start()
        self.dispatcher.wake()

    def _lost_on_restart(self, build: BuildRecord, jobs: list[JobRecord]) -> str:
        """Why a recovered build cannot go on ("" if it can)."""
        if build.spec.secret_ids:  # secrets live in memory only
            return (
                "the coordinator restarted, and this build's secrets "
                f"({', '.join(build.spec.secret_ids)}) were held in memory only: resubmit it"
            )
        # a job on an agent has the context there already; a queued one needs it from here
        digest = build.spec.context_digest
        queued = any(j.state is JobState.QUEUED for j in jobs)
        if queued and self.contexts.kind_of(digest) is None:
            return (
                f"this coordinator has no copy of the build's context {digest} (not in its "
                f"context dir {self.contexts.root}): coordinators sharing a database must "
                "share --context-dir; resubmit it (the CLI uploads the context again)"
            )
        return ""

    def _fail_unrecoverable(self, build: BuildRecord, jobs: list[JobRecord], reason: str) -> None:
        for job in jobs:
            if not job.state.terminal:
                job.error, job.failed_step = reason, "restart"
                self.ledger.move_job(build, job, JobState.FAILED, reason)
        self.ledger.finish(build, BuildState.FAILED, reason)

    async def settle(self) -> None:
        """Returns once dispatching is idle and every change is durable."""
        await self.dispatcher.settle()

    async def close(self) -> None:
        await self.dispatcher.stop()
        await self.completion.close()
        self.roster.close()
        # the last write failing (fenced after a takeover, the database gone) was logged
        # by the store; stopping goes on either way
        with contextlib.suppress(StoreError):
            await self.ledger.durable()

    # ---- client API -----------------------------------------------------------------------
    async def submit(
        self,
        spec: BuildSpec,
        idempotency_key: str,
        owner: str = "",
        credentials: BuildCredentials | None = None,
    ) -> tuple[BuildRecord, bool]:
        """Validates and records a build (durable when this returns); returns it and whether
        it already existed.

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
            existing = await self.store.find_by_idempotency_key(key)
            if existing is not None:
                return self._existing(existing, wanted, idempotency_key, credentials), True
        platforms = self._validate(spec)
        await self._check_supply_chain(spec, wanted, credentials)
        now = self.clock()
        build = BuildRecord(
            id=uuid.uuid4().hex[:16], spec=spec, created_at=now, idempotency_key=key,
            owner=owner, request_hash=wanted,
        )  # fmt: skip
        jobs = [
            JobRecord(id=f"{build.id}-{p.slug}", build_id=build.id, platform=str(p), queued_at=now)
            for p in platforms
        ]
        try:
            await self.store.create_build(build, jobs)
        except DuplicateIdempotencyKey as dup:
            first = await self.store.get_build(dup.build_id)
            assert first is not None
            return self._existing(first, wanted, idempotency_key, credentials), True
        self.metrics.builds_submitted.inc()
        self.vault.put(build.id, credentials)
        self.ledger.track(build, jobs)
        for job in jobs:
            self.metrics.job_transitions.labels(state=JobState.QUEUED.value).inc()
            self.enqueue(build, job)
        self.dispatcher.wake()
        return build, False

    def _existing(
        self, existing: BuildRecord, wanted: str, key: str, credentials: BuildCredentials
    ) -> BuildRecord:
        if existing.request_hash and existing.request_hash != wanted:
            raise AlreadyExists(
                f"idempotency key {key!r} already belongs to build {existing.id}, "
                "which asked for something else; use a new key for a new request"
            )
        live = self.ledger.live(existing.id)
        if live is not None:
            self.vault.put(existing.id, credentials)
            return live[0]
        return existing

    async def check_owner(self, build_id: str, token_id: str, is_admin: bool) -> None:
        """Raises PermissionDenied unless the caller submitted the build or is an admin (who
        may cancel or export it)."""
        build, _ = await self.get(build_id)
        if not is_admin and build.owner != token_id:
            raise PermissionDenied(f"build {build_id} was submitted by another token")

    async def get(self, build_id: str) -> tuple[BuildRecord, list[JobRecord]]:
        return await self.ledger.get(build_id)

    async def list_page(
        self, limit: int, before: tuple[float, str] | None
    ) -> list[tuple[BuildRecord, list[JobRecord]]]:
        """Builds newest first after the cursor, each with its jobs (live ones from memory),
        in two store queries whatever the page size."""
        records = await self.store.list_builds_page(limit, before)
        stored = await self.store.jobs_of_many([b.id for b in records])
        return [self.ledger.live(b.id) or (b, stored.get(b.id, [])) for b in records]

    async def cancel(self, build_id: str, reason: str) -> None:
        build, jobs = await self.get(build_id)
        if build.state.terminal or not self.ledger.is_active(build_id):
            return
        self.completion.cancel(build_id)
        for job in jobs:
            if job.state.terminal:
                continue
            agent = self.scheduler.agent_of(job.id)
            if agent in self.sessions:
                self.sessions[agent].send(Cancel(job.id, job.attempt, reason))
            self.scheduler.release(job.id)
            job.error = reason
            self.ledger.move_job(build, job, JobState.CANCELLED, reason)
        self.ledger.finish(build, BuildState.CANCELLED, reason or "cancelled")
        self.dispatcher.wake()
        await self.ledger.durable()

    async def watch(self, build_id: str, log_tail: int) -> AsyncIterator[BuildEvent]:
        """The build's snapshot, replayed log lines, then live events until the build ends."""
        queue = self.hub.subscribe(build_id)
        try:
            build, jobs = await self.get(build_id)
            yield BuildChanged(build, tuple(jobs))
            for job in jobs:
                for line in self.hub.log_tail(job.id, log_tail):
                    yield line
            if build.state.terminal:
                return
            while (event := await queue.get()) is not None:
                yield event
            if queue.cut_off:
                raise LimitExceeded(queue.cut_off)
        finally:
            self.hub.unsubscribe(build_id, queue)

    # ---- agent events -----------------------------------------------------------------------
    def attach_agent(self, hello: Hello, peer: str) -> AgentSession:
        """Registers a connected agent (see Roster.attach)."""
        session = self.roster.attach(hello, peer)
        self.dispatcher.wake()
        return session

    def detach_agent(
        self, session: AgentSession, reason: str, keep: set[tuple[str, int]] | None = None
    ) -> None:
        """The agent's stream ended: its running jobs go back to the queue, except those
        in `keep` (job id, attempt), which its new stream reports it still runs."""
        for job_id in self.roster.detach(session):
            found = self.ledger.find_job(job_id)
            if found is not None and (job_id, found[1].attempt) not in (keep or set()):
                self.retry(found[0], found[1], f"agent {session.name} {reason}",
                           avoid=session.name)  # fmt: skip
        self.dispatcher.wake()

    def disconnect_agent(self, name: str, reason: str) -> None:
        """Ends the live stream of agent `name`, if any (its jobs go back to the queue)."""
        session = self.sessions.get(name)
        if session is not None:
            self.detach_agent(session, reason)

    def set_draining(self, name: str, draining: bool, remember: bool = True) -> AgentSession:
        """Stops (or resumes) assigning to an agent; `remember` keeps it across reconnects."""
        session = self.roster.set_draining(name, draining, remember)
        if not draining:
            self.dispatcher.wake()
        return session

    def job_started(self, agent: str, job_id: str, attempt: int) -> None:
        found = self.roster.current(agent, job_id, attempt, "started")
        if found is not None:
            build, job = found
            job.started_at = self.clock()
            self.ledger.move_job(build, job, JobState.RUNNING, f"started on {agent}")

    def job_log(self, agent: str, job_id: str, attempt: int, lines: list[str]) -> None:
        found = self.roster.current(agent, job_id, attempt, "log")
        if found is not None:
            build, job = found
            for line in lines:
                self.hub.publish_log(build.id, LogLine(job.id, job.platform, job.attempt, line))

    def job_result(self, agent: str, job_id: str, attempt: int, outcome: JobOutcome) -> None:
        found = self.roster.current(agent, job_id, attempt, "result")
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
        verdict, error, step = judge(outcome, job.attempt, agent)
        if verdict is Verdict.PUSHED:
            job.digest, job.size, job.media_type = outcome.digest, outcome.size, outcome.media_type
            self.ledger.move_job(build, job, JobState.PUSHED, f"pushed {outcome.digest}")
        elif verdict is Verdict.RETRY:
            self.retry(build, job, error, avoid=agent, kind=RetryKind.INFRASTRUCTURE)
        else:
            job.error, job.failed_step = error, step
            self.ledger.move_job(build, job, JobState.FAILED, error)
        # counts attempts: result="retried" is an attempt whose job went back to the queue
        self.metrics.jobs_finished.labels(
            platform=job.platform, mode=mode, result=verdict.value
        ).inc()
        self.completion.check(build)
        self.dispatcher.wake()

    # ---- timeouts (the lease watchdog drives these) ------------------------------------------
    def expire_orphans(self) -> None:
        """Re-queues recovered jobs whose agent did not come back to claim them in time."""
        for build, job in self.roster.expired_orphans():
            reason = f"agent {job.agent} did not return after a restart"
            self.retry(build, job, reason, kind=RetryKind.RESTART)
        self.dispatcher.wake()

    def expire_overdue_jobs(self) -> None:
        """Cancels, on their agents, attempts without a result after job_timeout_seconds and
        re-queues them as infrastructure failures; a late result of such an attempt is stale
        and ignored. Looks only at jobs on agents: its work is bounded by the fleet's slots."""
        limit = self.limits.job_timeout_seconds
        live = self.roster.jobs_on_agents()
        for build, job in self._attempts.overdue(live, self.clock(), limit):
            reason, agent = timeout_reason(limit), job.agent
            if agent in self.sessions:
                self.sessions[agent].send(Cancel(job.id, job.attempt, reason))
            log.warning("job %s attempt %d on %s: %s", job.id, job.attempt, agent, reason)
            self.retry(build, job, f"{reason} on {agent}", avoid=agent,
                       kind=RetryKind.INFRASTRUCTURE)  # fmt: skip
        self.dispatcher.wake()

    # ---- the retry policy's one caller ---------------------------------------------------------
    def retry(
        self, build: BuildRecord, job: JobRecord, reason: str, avoid: str = "",
        kind: RetryKind = RetryKind.AGENT_LOST,
    ) -> None:  # fmt: skip
        """An attempt ended without a verdict of its own: the job goes back to the queue, or
        fails when it is out of attempts (states.after_lost_attempt decides)."""
        self.scheduler.release(job.id)
        job.requeue_reasons.append(reason)
        self.metrics.requeues.labels(reason=kind.value).inc()
        if after_lost_attempt(job) is JobState.FAILED:
            job.error = gave_up(job, reason)
            job.finished_at = self.clock()
            self.ledger.move_job(build, job, JobState.FAILED, reason)
            self.completion.check(build)
            return
        job.queued_at = self.clock()
        # job.agent stays: it names the last agent, which may reconnect and re-attach the attempt
        self.ledger.move_job(build, job, JobState.QUEUED, reason)
        self.enqueue(build, job, avoid)

    def enqueue(self, build: BuildRecord, job: JobRecord, avoid: str = "") -> None:
        self.roster.enqueue(build, job, avoid)

    async def _check_supply_chain(
        self, spec: BuildSpec, wanted: str, credentials: BuildCredentials
    ) -> None:
        """The gate's policy, then its immutable tags against the registry (with the build's
        own credentials first). The check is made again right before the index PUT: a tag
        may appear while the build runs."""
        self.gate.check_submit_policy(spec)
        if self.registry is None or not self.gate.immutable or spec.no_publish:
            return
        await self.gate.check_submit_tags(
            client_for(self.registry, credentials), spec, lambda: self._published_by(wanted)
        )

    async def _published_by(self, wanted: str) -> frozenset[str]:
        """Index digests that recent succeeded builds of the same request published (the
        newest _SAME_REQUEST_WINDOW builds are looked at: a bounded scan, no new index)."""
        found: set[str] = set()
        before: tuple[float, str] | None = None
        for _ in range(_SAME_REQUEST_WINDOW // 100):
            page = await self.store.list_builds_page(100, before)
            found.update(
                b.index_digest for b in page
                if b.request_hash == wanted and b.state is BuildState.SUCCEEDED and b.index_digest
            )  # fmt: skip
            if len(page) < 100:
                break
            before = (page[-1].created_at, page[-1].id)
        return frozenset(found)

    def _validate(self, spec: BuildSpec) -> list[Platform]:
        """Checks a submission; fills in the registry and repository its tags share."""
        platforms = validate_spec(spec, self.contexts, self.limits, self.scratch_repository)
        now, expected = self.clock(), self.roster.expected
        unschedulable = [
            p for p in platforms
            if not self.scheduler.eligible_modes(p, spec.emulation)
            and not expected.covers(p, spec.emulation, now)
        ]  # fmt: skip
        if unschedulable:
            raise Unschedulable(
                describe_unschedulable(unschedulable, spec.emulation, self.sessions)
            )
        if spec.cache_from or spec.cache_to:
            candidates = {p: self.roster.candidates(p, spec.emulation) for p in platforms}
            refuse_unhonoured_caches(spec, candidates)
        return platforms

"""Prometheus metrics of the coordinator, on a registry of its own (never the global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Builds run from seconds (tiny images) to an hour (emulated compiles).
_BUILD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 2400, 3600)
# A group commit is one fsync plus the rows of every write that queued meanwhile.
_STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class FleetSnapshot:
    """The numbers the fleet gauges report, as the event loop last published them (its dicts
    are fresh copies, never changed after publishing)."""

    queued_by_platform: dict[str, int]
    # (state, architecture) -> agents
    agents_by_state: dict[tuple[str, str], int]
    # agent name -> (slots, in use)
    slots: dict[str, tuple[int, int]]
    builds_by_state: dict[str, int]


EMPTY_FLEET = FleetSnapshot({}, {}, {}, {})


class _FleetCollector(Collector):
    """Reads the last published snapshot: the scrape runs on the HTTP server's thread and
    must never iterate the loop's live dicts."""

    def __init__(self, latest: Callable[[], FleetSnapshot]) -> None:
        self._latest = latest

    def collect(self) -> Iterable[Metric]:
        snap = self._latest()
        depth = GaugeMetricFamily(
            "polyarch_queue_depth", "Jobs waiting for an agent.", labels=["platform"]
        )
        for platform, count in sorted(snap.queued_by_platform.items()):
            depth.add_metric([platform], count)
        agents = GaugeMetricFamily(
            "polyarch_agents", "Known agents by state and architecture.", labels=["state", "arch"]
        )
        for (state, arch), count in sorted(snap.agents_by_state.items()):
            agents.add_metric([state, arch], count)
        slots = GaugeMetricFamily(
            "polyarch_agent_slots", "Build slots per agent.", labels=["agent"]
        )
        in_use = GaugeMetricFamily(
            "polyarch_agent_slots_in_use", "Build slots running a job.", labels=["agent"]
        )
        for name, (total, used) in sorted(snap.slots.items()):
            slots.add_metric([name], total)
            in_use.add_metric([name], used)
        builds = GaugeMetricFamily("polyarch_builds", "Builds by current state.", labels=["state"])
        for state, count in sorted(snap.builds_by_state.items()):
            builds.add_metric([state], count)
        yield from (depth, agents, slots, in_use, builds)


class CoordinatorMetrics:
    """Counters and histograms the coordinator updates as things happen."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.builds_submitted = Counter(
            "polyarch_builds_submitted", "Builds accepted by SubmitBuild.", registry=r
        )
        self.auth_refusals = Counter(
            "polyarch_auth_refusals", "Calls refused by authentication or role, by reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.builds_finished = Counter(
            "polyarch_builds_finished", "Builds that ended, by result.", ["result"], registry=r
        )
        self.job_transitions = Counter(
            "polyarch_job_transitions", "Job state transitions, by new state.", ["state"],
            registry=r,
        )  # fmt: skip
        self.jobs_finished = Counter(
            "polyarch_jobs_finished", "Job attempts that ended: pushed, failed or retried.",
            ["platform", "mode", "result"], registry=r,
        )  # fmt: skip
        self.job_duration = Histogram(
            "polyarch_job_duration_seconds", "Time from a job starting on an agent to its end.",
            ["platform", "mode"], buckets=_BUILD_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "polyarch_queue_wait_seconds", "Time from a job being queued to being assigned.",
            ["platform"], buckets=_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.assembly_duration = Histogram(
            "polyarch_index_assembly_seconds", "Time to verify children and push the index.",
            buckets=_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.scans = Counter(
            "polyarch_image_scans", "Scan-gate runs, one per platform image, by outcome "
            "(passed, failed, timeout).", ["outcome"], registry=r,
        )  # fmt: skip
        self.registry_errors = Counter(
            "polyarch_registry_request_errors", "Failed registry requests, by kind.", ["kind"],
            registry=r,
        )  # fmt: skip
        self.context_bytes_received = Counter(
            "polyarch_context_bytes_received", "Build context bytes uploaded by clients.",
            registry=r,
        )  # fmt: skip
        self.context_bytes_served = Counter(
            "polyarch_context_bytes_served", "Build context bytes sent to agents.", registry=r
        )
        # Deduplication of incremental contexts: what a manifest upload did not need sent.
        self.context_blobs = Counter(
            "polyarch_context_blobs", "File blobs of uploaded context manifests, by outcome: "
            "uploaded (received and stored), deduplicated (already stored, so not sent), "
            "discarded (sent while another upload stored it).", ["outcome"], registry=r,
        )  # fmt: skip
        self.context_bytes_deduplicated = Counter(
            "polyarch_context_bytes_deduplicated", "Bytes of file blobs uploaded context "
            "manifests listed that the coordinator already held (not sent).", registry=r,
        )  # fmt: skip
        self.exports = Counter(
            "polyarch_exports", "Build exports streamed to clients, by format and outcome.",
            ["format", "outcome"], registry=r,
        )  # fmt: skip
        self.export_bytes = Counter(
            "polyarch_export_bytes", "Bytes of build exports streamed to clients.", registry=r
        )
        self.stale_messages = Counter(
            "polyarch_stale_agent_messages", "Agent messages ignored because their attempt is old.",
            ["kind"], registry=r,
        )  # fmt: skip
        self.requeues = Counter(
            "polyarch_job_requeues", "Jobs put back in the queue, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip

        self.store_write_seconds = Histogram(
            "polyarch_store_write_seconds",
            "Time from a state change to its durable commit (group commit).",
            buckets=_STORE_BUCKETS, registry=r,
        )  # fmt: skip
        self.store_commit_writes = Histogram(
            "polyarch_store_commit_writes", "State changes that shared one commit.",
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.store_commit_seconds = Histogram(
            "polyarch_store_commit_seconds",
            "Time the database took to apply one commit's state changes and commit them.",
            buckets=_STORE_BUCKETS, registry=r,
        )  # fmt: skip
        self.contexts_deleted = Counter(
            "polyarch_contexts_deleted", "Unused build contexts deleted by garbage collection.",
            registry=r,
        )  # fmt: skip
        self.context_bytes_deleted = Counter(
            "polyarch_context_bytes_deleted", "Bytes of build contexts garbage-collected.",
            registry=r,
        )  # fmt: skip
        # Read at scrape time through set_function (wired by the coordinator).
        self.context_store_bytes = Gauge(
            "polyarch_context_store_bytes", "Bytes of build contexts stored.", registry=r
        )
        self.context_uploads_in_flight = Gauge(
            "polyarch_context_uploads_in_flight", "Context uploads being received.", registry=r
        )
        # High availability (coordinator/ha): 0 on a standby, so a dashboard sums to 1.
        self.coordinator_active = Gauge(
            "polyarch_coordinator_active",
            "1 while this coordinator is the active one (dispatching), 0 while standby.",
            registry=r,
        )  # fmt: skip
        self.failovers = Counter(
            "polyarch_coordinator_failovers", "Terms this coordinator won: its first "
            "election, and each takeover from another.", registry=r,
        )  # fmt: skip

    def watch_fleet(self) -> None:
        """Registers the fleet gauges; they report what publish_fleet last handed over."""
        self._fleet = EMPTY_FLEET
        self.registry.register(_FleetCollector(lambda: self._fleet))

    def publish_fleet(self, snapshot: FleetSnapshot) -> None:
        """Called on the event loop; one reference assignment, atomic for the scrape thread."""
        self._fleet = snapshot

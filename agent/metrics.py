"""Prometheus metrics of one agent, on a registry of its own (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUILD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 2400, 3600)


class AgentMetrics:
    """What an agent did: jobs by result, build time, slots, stream health."""

    def __init__(self, slots: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "polyarch_agent_jobs", "Jobs this agent finished, by platform and result.",
            ["platform", "result"], registry=r,
        )  # fmt: skip
        self.job_duration = Histogram(
            "polyarch_agent_job_duration_seconds", "Time from assignment to result.",
            ["platform"], buckets=_BUILD_BUCKETS, registry=r,
        )  # fmt: skip
        self.slots = Gauge("polyarch_agent_build_slots", "Builds this agent runs at once.",
                           registry=r)  # fmt: skip
        self.slots.set(slots)
        self.slots_in_use = Gauge(
            "polyarch_agent_build_slots_in_use", "Builds running now.", registry=r
        )
        self.connected = Gauge(
            "polyarch_agent_connected", "1 while the stream to the coordinator is up.", registry=r
        )
        self.reconnects = Counter(
            "polyarch_agent_reconnects", "Times the stream to the coordinator was re-opened.",
            registry=r,
        )  # fmt: skip
        self.context_bytes_fetched = Counter(
            "polyarch_agent_context_bytes_fetched", "Build context bytes downloaded.", registry=r
        )

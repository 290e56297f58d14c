"""What agents, the coordinator and clients agree on: leases, heartbeat pace, slots, log markers."""

from __future__ import annotations

# The most concurrent jobs one agent may offer; the coordinator refuses a hello with more.
MAX_AGENT_SLOTS = 64
# An agent's lease is this many heartbeat intervals: one late heartbeat never costs the jobs.
LEASE_HEARTBEATS = 3
# The coordinator's default lease (its --agent-timeout).
DEFAULT_AGENT_LEASE = 10.0


def heartbeat_interval_for(lease: float) -> float:
    """The heartbeat interval the coordinator tells agents (Welcome.heartbeat_interval_ms)."""
    return lease / LEASE_HEARTBEATS


# What an agent uses until a Welcome sets the pace (and if one ever says 0).
DEFAULT_HEARTBEAT_INTERVAL = heartbeat_interval_for(DEFAULT_AGENT_LEASE)


# The builder log line an agent writes as it starts pushing a platform's image
# (`polyarch: pushing REF`): `--progress tty` shows the job's push phase from it.
PUSHING_MARKER = "polyarch: pushing"

"""The fault-test fleet with two coordinators on one PostgreSQL: one active, one standby.

Both are real `polyarch coordinator` processes on the fleet network's gateway, each with its
own --data-dir and the one shared --context-dir; agents (containers) and the CLI are given
both addresses and follow whichever is active. What the farm recorded is read straight from
the database (jobs and their transitions), not through polyarch.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from .agent_containers import (
    CoordinatorProcess,
    Fleet,
    ensure_agent_image,
    fleet_network,
    gateway_coordinator,
)
from .poll import wait_until

AGENT_TIMEOUT = "10"  # the lease; also how long a new active waits for agents to re-attach
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def metric(coordinator: CoordinatorProcess, name: str) -> float | None:
    """One unlabelled sample from the coordinator's own metrics (a quick local scrape);
    None when it is not running or does not answer."""
    if coordinator.proc is None or coordinator.proc.poll() is not None:
        return None
    try:
        url = f"http://{coordinator.metrics_listen}/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def is_active(coordinator: CoordinatorProcess) -> bool:
    """Its own metrics say it is the active coordinator."""
    return metric(coordinator, "polyarch_coordinator_active") == 1.0


def logged_at(coordinator: CoordinatorProcess, needle: str) -> datetime:
    """When the coordinator's current log first says `needle` (its own clock, ms)."""
    for line in coordinator.log_path.read_text(errors="replace").splitlines():
        stamp = _LOG_TIME.match(line)
        if needle in line and stamp:
            return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
    raise AssertionError(f"{coordinator.data_dir.name} never logged {needle!r}")


@dataclass
class HAFleet(Fleet):
    """A Fleet whose `coordinator` is the first one started (active at first); `standby` is
    the other. Agents and the CLI get both addresses."""

    standby: CoordinatorProcess | None = None
    dsn: str = ""

    @property
    def coordinators(self) -> list[CoordinatorProcess]:
        assert self.standby is not None
        return [self.coordinator, self.standby]

    @property
    def address(self) -> str:
        return ",".join(c.address for c in self.coordinators)

    def agent_args(self) -> list[str]:
        # the two listen on one address with different agent ports: name each one's
        return ["--agent-channel", ",".join(c.agent_listen for c in self.coordinators)]

    def active(self, timeout: float = 30.0) -> CoordinatorProcess:
        """The one coordinator that says it is active (waits for a takeover to finish)."""
        found: CoordinatorProcess = wait_until(
            lambda: next((c for c in self.coordinators if is_active(c)), None),
            timeout=timeout, interval=0.05, message="an active coordinator",
        )  # fmt: skip
        return found

    def assignments(self) -> list[tuple[str, int]]:
        """(job id, attempt) of every transition to `assigned` the database recorded."""
        with psycopg.connect(self.dsn) as db:
            rows = db.execute(
                "SELECT job_id, attempt FROM job_transitions WHERE state = 'assigned' ORDER BY seq"
            ).fetchall()
        return [(str(job), int(attempt)) for job, attempt in rows]

    def diagnostics(self) -> str:
        parts = [c.logs()[-5000:] for c in self.coordinators]
        for agent in self.agents.values():
            parts.append(f"--- agent {agent.name} ---\n{agent.logs()[-3000:]}")
        return "\n".join(parts)


@contextmanager
def running_ha_fleet(
    work_dir: Path,
    dsn: str,
    agent_names: Sequence[str] = (),
    active_dsn: str = "",
    slots: int = 2,
) -> Iterator[HAFleet]:
    """Two coordinators (the first active, on `active_dsn` if given: e.g. through a
    partitionable proxy) and agent containers; all torn down after, by id and PID."""
    ensure_agent_image()
    work_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        network, gateway = cleanup.enter_context(fleet_network())

        def coordinator(name: str, database: str) -> CoordinatorProcess:
            process = gateway_coordinator(
                gateway, work_dir / name, work_dir,
                ["--database", database, "--context-dir", str(work_dir / "contexts"),
                 "--agent-timeout", AGENT_TIMEOUT],
            )  # fmt: skip
            cleanup.callback(process.stop)
            return process

        first = coordinator("coordinator-a", active_dsn or dsn)
        first.start()
        wait_until(lambda: is_active(first), timeout=30, interval=0.1, message="a active")
        second = coordinator("coordinator-b", dsn)
        second.start()
        fleet = HAFleet(network, gateway, first, work_dir, standby=second, dsn=dsn)
        cleanup.callback(fleet.remove_agents)
        fleet.start_agents(agent_names, slots)
        yield fleet


def job_ids_of(build: dict[str, Any]) -> set[str]:
    return {str(job["id"]) for job in build["jobs"]}

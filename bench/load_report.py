"""The figures of bench/load.py: computed from one scenario's raw records, and printed."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scenario:
    name: str
    agents: int
    slots: int
    builds: int
    platforms: list[str]
    job_seconds: float
    # aggregate submits per second the clients keep to (open loop); 0: as fast as they can
    rate: float = 0.0

    @property
    def jobs(self) -> int:
        return self.builds * len(self.platforms)

    @property
    def ideal_makespan(self) -> float:
        """All work spread perfectly over all slots (every agent builds every platform)."""
        return self.jobs * self.job_seconds / (self.agents * self.slots)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.agents} agents x {self.slots} slots, {self.builds} builds of "
            f"{'+'.join(self.platforms)}, {self.job_seconds:g} s jobs"
            + (f", submitted at {self.rate:g}/s" if self.rate else "")
        )


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "count": len(ordered),
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "max_ms": ordered[-1] * 1000,
    }


def figures_of(
    scenario: Scenario,
    *,
    sent: list[tuple[str, float, float]],
    reports: list[dict[str, Any]],
    builds: list[Any],
    lag: dict[str, Any],
    counters: dict[str, float],
    cpu: dict[str, float],
    cpu_submitting: dict[str, float],
    rss: tuple[int, int],
    times: dict[str, Any],
) -> dict[str, Any]:
    """Every figure of one scenario run; see bench/README.md for what each one means."""
    submit = [(answered - start) for _, start, answered in sent]
    # a queue has formed once the first full fleet's worth of jobs is in
    formed_after = math.ceil(scenario.agents * scenario.slots / len(scenario.platforms))
    queued = sent[formed_after:]
    sent_at = {build_id: start for build_id, start, _ in sent}
    first_arrival: dict[tuple[str, str], float] = {}
    agents: dict[str, Any] = {}
    for report in reports:
        agents.update(report["agents"])
        for _agent, build_id, platform, arrived in report["assignments"]:
            key = (build_id, platform)
            first_arrival[key] = min(arrived, first_arrival.get(key, arrived))
    dispatch = [t - sent_at[b] for (b, _), t in first_arrival.items() if b in sent_at]
    eligible = [a for a in agents.values() if set(a["platforms"]) & set(scenario.platforms)]
    per_agent = [a["jobs"] for a in eligible]
    ours = [b for b in builds if b.id in sent_at]
    states = Counter(b.state for b in ours)
    finished = [
        b.finished_at.seconds + b.finished_at.nanos / 1e9 for b in ours if b.finished_at.seconds
    ]
    wall = times["end"] - times["mono_start"]
    makespan = (max(finished) - times["wall_start"]) if finished and times["finished"] else None
    ended = sum(len(a["ended_by_coordinator"]) for a in agents.values())
    requeues = counters.get("polyarch_job_requeues_total", 0.0)
    figures: dict[str, Any] = {
        "scenario": scenario.describe(),
        "completed": times["finished"],
        "builds_succeeded": states.get(4, 0),  # BUILD_STATE_SUCCEEDED
        "builds_other": sum(n for s, n in states.items() if s != 4),
        "submits_per_s": len(sent) / (sent[-1][2] - sent[0][1]) if sent else 0.0,
        "submit_latency": spread(submit),
        "dispatch_latency": spread(dispatch),
        "spread_min": min(per_agent, default=0),
        "spread_max": max(per_agent, default=0),
        "spread_stdev": statistics.pstdev(per_agent) if per_agent else 0.0,
        "spread_mean": statistics.fmean(per_agent) if per_agent else 0.0,
        "coordinator_cpu_s": cpu["coordinator"],
        "coordinator_cpu_ms_per_job": 1000 * cpu["coordinator"] / scenario.jobs,
        "cpu_percent": {name: 100 * seconds / wall for name, seconds in cpu.items()},
        "cpu_percent_submitting": {
            name: 100 * seconds / (times["submitted"] - times["mono_start"])
            for name, seconds in cpu_submitting.items()
        },
        "rss_kib_before_agents": rss[0],
        "rss_kib_after_agents": rss[1],
        "rss_kib_per_agent": (rss[1] - rss[0]) / scenario.agents,
        "streams_ended_by_coordinator": ended,
        "job_requeues": requeues,
        "false_expiries": ended + requeues,
        "loop_lag": lag,
        "makespan_s": makespan,
        "ideal_makespan_s": scenario.ideal_makespan,
        "makespan_ratio": makespan / scenario.ideal_makespan
        if makespan and scenario.ideal_makespan
        else None,
        # makespan cannot beat the submits: this part is the drain after the last one
        "drain_after_submits_s": (max(finished) - times["wall_start"])
        - (sent[-1][2] - times["mono_start"])
        if finished and sent
        else None,
        "wall_s": wall,
    }
    if queued:
        figures["queued_submits_per_s"] = len(queued) / (queued[-1][2] - queued[0][1])
        figures["queued_submit_latency"] = spread([a - s for _, s, a in queued])
    return figures


def _get(figures: dict[str, Any], path: str) -> Any:
    value: Any = figures
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


# (scenario, figure path, label, goal)
ROWS = [
    ("idle", "submits_per_s", "submits/s (16 clients)", ""),
    ("idle", "submit_latency.p50_ms", "submit p50 ms", ""),
    ("idle", "submit_latency.p99_ms", "submit p99 ms", ""),
    ("idle", "dispatch_latency.p50_ms", "dispatch p50 ms", ""),
    ("idle", "dispatch_latency.p99_ms", "dispatch p99 ms", "< 10 (goal 2)"),
    ("idle", "spread_min", "jobs/agent min", "~ mean"),
    ("idle", "spread_max", "jobs/agent max", "~ mean"),
    ("idle", "spread_stdev", "jobs/agent stdev", "small"),
    ("idle", "coordinator_cpu_ms_per_job", "coordinator CPU ms/job", ""),
    ("idle", "rss_kib_per_agent", "RSS KiB per agent", "<= 100 (goal 4)"),
    ("idle", "false_expiries", "false expiries", "0 (goal 5)"),
    ("idle", "loop_lag.p99_ms", "heartbeat p99 ms (loop lag)", "< 100 (goal 5)"),
    ("idle", "cpu_percent_submitting.coordinator", "CPU % coordinator", "< 100: not saturated"),
    ("idle", "cpu_percent_submitting.harness", "CPU % harness (clients)", "< 100"),
    ("idle", "cpu_percent_submitting.agents", "CPU % fake agents", "< 100"),
    ("paced", "submits_per_s", "submits/s (16 clients, paced)", ""),
    ("paced", "submit_latency.p99_ms", "submit p99 ms", ""),
    ("paced", "dispatch_latency.p50_ms", "dispatch p50 ms", ""),
    ("paced", "dispatch_latency.p99_ms", "dispatch p99 ms", "< 10 (goal 2)"),
    ("paced", "cpu_percent_submitting.coordinator", "CPU % coordinator", "< 100: not saturated"),
    ("queue", "queued_submits_per_s", "submits/s, queue formed", ">= 500 (goal 1)"),
    ("queue", "queued_submit_latency.p99_ms", "submit p99 ms, queue formed", "< 50 (goal 1)"),
    ("queue", "makespan_s", "makespan s", ""),
    ("queue", "ideal_makespan_s", "ideal makespan s", ""),
    ("queue", "makespan_ratio", "makespan / ideal", "<= 1.1 (goal 3)"),
    ("queue", "drain_after_submits_s", "  of which after the last submit", ""),
    ("queue", "coordinator_cpu_ms_per_job", "coordinator CPU ms/job", "<= 1 (goal 4)"),
    ("queue", "rss_kib_per_agent", "RSS KiB per agent", "<= 100 (goal 4)"),
    ("queue", "false_expiries", "false expiries", "0 (goal 5)"),
    ("queue", "loop_lag.p99_ms", "heartbeat p99 ms (loop lag)", "< 100 (goal 5)"),
    ("queue", "cpu_percent_submitting.coordinator", "CPU % coordinator, submitting", "< 100"),
    ("queue", "cpu_percent_submitting.harness", "CPU % harness, submitting", "< 100"),
    ("queue", "cpu_percent_submitting.agents", "CPU % fake agents, submitting", "< 100"),
    ("queue", "cpu_percent.coordinator", "CPU % coordinator, whole run", ""),
    ("queue", "cpu_percent.agents", "CPU % fake agents, whole run", ""),
    ("queue", "builds_succeeded", "builds succeeded", "all"),
]

LAG_NOTE = (
    "heartbeat p99 = p99 overshoot of a 5 ms asyncio.sleep probe in the coordinator's "
    "event loop during the scenario: a heartbeat waits about that long to be handled."
)


def print_tree(tree: str, scenario: str, figures: dict[str, Any]) -> None:
    print(f"\n== {tree} -- {figures.get('scenario', scenario)}")
    if "error" in figures:
        print(f"   FAILED: {figures['error']}")
        return
    for row_scenario, path, label, goal in ROWS:
        if row_scenario == scenario:
            print(f"   {label:<30} {_show(_get(figures, path)):>10}   {goal}")
    if figures.get("note"):
        print(f"   note: {figures['note']}")
    extras = {k: _show(_get(figures, k)) for k in ("completed", "wall_s", "builds_other")}
    print(f"   ({', '.join(f'{k} {v}' for k, v in extras.items())})", flush=True)


def print_side_by_side(results: dict[str, dict[str, Any]]) -> None:
    trees = list(results)
    names = ["before", "after"] if len(trees) == 2 else [f"tree {i}" for i in range(len(trees))]
    print(
        "\n== side by side: " + " | ".join(f"{n} = {t}" for n, t in zip(names, trees, strict=True))
    )
    header = f"   {'scenario':<6} {'figure':<30}" + "".join(f"{n:>12}" for n in names) + "   goal"
    print(header)
    for scenario, path, label, goal in ROWS:
        cells = []
        for tree in trees:
            figures = results[tree].get(scenario)
            if figures is None:
                cells.append("")
            elif "error" in figures:
                cells.append("FAILED")
            else:
                cells.append(_show(_get(figures, path)))
        if any(cells):
            print(
                f"   {scenario:<6} {label:<30}" + "".join(f"{c:>12}" for c in cells) + f"   {goal}"
            )
    print(f"\n   {LAG_NOTE}")

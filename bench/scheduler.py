"""Time per scheduling event, the old full-rescan scheduler against the incremental one.

Run with `.venv/bin/python bench/scheduler.py [--budget 3] [--events 2000]`.
The old scheduler is the tree before issue 11 (git 0bb624d, coordinator/scheduler.py),
read from /work/before or from git and loaded as a temporary module. Both get the
same fleet (70% of agents native linux/amd64 and emulating linux/arm64, 30% native
linux/arm64, 2 slots each), every slot busy and a backlog of queued jobs (builds of
10 jobs, both platforms, FALLBACK). An event is what the manager does on a submit
(enqueue + schedule) or on a result (release + schedule, which places one queued
job). The old scheduler runs events until --budget seconds are spent (at least 2);
the new one runs --events of each kind. Prints the mean per event and the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from polyarch.coordinator.core import scheduler as new_scheduler  # noqa: E402
from polyarch.coordinator.core.model import EmulationPolicy  # noqa: E402
from polyarch.proto.platforms import Platform, parse_platform  # noqa: E402

OLD_COMMIT = "0bb624d"
AMD64 = parse_platform("linux/amd64")
ARM64 = parse_platform("linux/arm64")


def load_old_scheduler() -> ModuleType:
    """The pre-issue-11 scheduler as a module, importing today's model (same enums)."""
    before = Path("/work/before/coordinator/scheduler.py")
    if before.exists():
        source = before.read_text()
    else:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:coordinator/scheduler.py"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    source = source.replace("polyarch.coordinator.model", "polyarch.coordinator.core.model")
    path = Path(tempfile.mkdtemp(prefix="old-scheduler-")) / "old_scheduler.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_scheduler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_scheduler"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Workload:
    """One scheduler with a busy fleet and a backlog, and the two kinds of event."""

    def __init__(self, module: ModuleType, agents: int, queued: int, seed: int) -> None:
        self.m = module
        self.rng = random.Random(seed)
        self.s: Any = module.Scheduler()
        self.next_job = 0
        self.platform_of: dict[str, Platform] = {}
        self.refill = ""
        for i in range(agents):
            if i % 10 < 7:
                view = module.AgentView(f"agent-{i:04}", frozenset({AMD64}), frozenset({ARM64}), 2)
            else:
                view = module.AgentView(f"agent-{i:04}", frozenset({ARM64}), frozenset(), 2)
            self.s.add_agent(view)
        self.running: list[str] = []
        # fill every slot first (a short queue), then pile up the backlog
        for i in range(agents * 2):
            self.s.enqueue(self.new_job(AMD64 if i // 2 % 10 < 7 else ARM64))
        self.running = [p.job_id for p in self.s.schedule()]
        assert len(self.running) == agents * 2, len(self.running)
        for _ in range(queued):
            self.s.enqueue(self.new_job())

    def new_job(self, platform: Platform | None = None) -> Any:
        self.next_job += 1
        platform = platform or (AMD64 if self.rng.random() < 0.6 else ARM64)
        build = f"b{self.next_job // 10}"
        job_id, repository = f"j{self.next_job}", f"team/r{self.next_job // 10 % 50}"
        self.platform_of[job_id] = platform
        return self.m.QueuedJob(job_id, build, platform, EmulationPolicy.FALLBACK, repository)

    def submit(self) -> None:
        self.s.enqueue(self.new_job())
        self.running.extend(p.job_id for p in self.s.schedule())

    def result(self) -> None:
        done = self.running.pop(self.rng.randrange(len(self.running)))
        self.s.release(done)
        placed = self.s.schedule()
        assert len(placed) == 1, placed
        self.running.extend(p.job_id for p in placed)
        self.refill = placed[0].job_id

    def keep_backlog(self) -> None:
        """Untimed: a job like the one just placed joins the queue, so the backlog stays."""
        self.s.enqueue(self.new_job(self.platform_of[self.refill]))


def per_event(
    event: Callable[[], None], budget: float, at_least: int, at_most: int,
    untimed: Callable[[], None] = lambda: None,
) -> float:  # fmt: skip
    """Mean seconds per call of `event`, run until `budget` is spent (within the bounds)."""
    times: list[float] = []
    spent = 0.0
    while len(times) < at_most and (len(times) < at_least or spent < budget):
        start = time.perf_counter()
        event()
        times.append(time.perf_counter() - start)
        spent += times[-1]
        untimed()
    return statistics.fmean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per old measurement")
    parser.add_argument("--events", type=int, default=2000, help="events per new measurement")
    args = parser.parse_args()
    old = load_old_scheduler()
    print(f"old: {old.__file__}\nnew: {new_scheduler.__file__}", file=sys.stderr)
    rows = []
    for agents, queued in ((100, 2000), (1000, 20000)):
        for name, module in (("old", old), ("new", new_scheduler)):
            start = time.perf_counter()
            work = Workload(module, agents, queued, seed=1)
            setup = time.perf_counter() - start
            least, most = (2, 10**9) if name == "old" else (args.events, args.events)
            budget = args.budget if name == "old" else 0.0
            submit = per_event(work.submit, budget, least, most)
            result = per_event(work.result, budget, least, most, untimed=work.keep_backlog)
            rows.append((agents, queued, name, setup, submit, result))
            print(f"  {name}: {agents} agents, {queued} queued: set up in {setup:.1f} s",
                  file=sys.stderr)  # fmt: skip
    print(
        f"{'agents x slots':>14} {'queued':>7} {'event':>18} {'old':>11} {'new':>11} {'ratio':>9}"
    )
    for i in range(0, len(rows), 2):
        (agents, queued, _, _, old_submit, old_result) = rows[i]
        (_, _, _, _, new_submit, new_result) = rows[i + 1]
        for event, o, n in (("enqueue+schedule", old_submit, new_submit),
                            ("release+schedule", old_result, new_result)):  # fmt: skip
            print(f"{f'{agents} x 2':>14} {queued:>7} {event:>18} {o * 1e3:>8.2f} ms "
                  f"{n * 1e6:>8.1f} us {o / n:>8.0f}x")  # fmt: skip


if __name__ == "__main__":
    main()

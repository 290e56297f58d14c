"""What group commit buys: the old synchronous SQLite store against the threaded one.

Each round runs both stores, alternating, each in its own process (the old store is the
tree before commit e7568a3, importable through --before) on a file on disk. K asyncio
tasks drive N build lifecycles (create_build, then 8 save_job and 2 save_build), each write
an RPC of its own: it yields to the loop, writes, and awaits durability. "write latency" is
the store call until durable; "rpc latency" adds the wait for a busy loop. A probe task
sleeps 1 ms in a loop and records how late it wakes: the event loop's lag.

    PYTHONPATH=/tmp/storeshim .venv/bin/python bench/store.py --builds 300 --tasks 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROBE_INTERVAL = 0.001


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def drive(kind: str, builds: int, tasks: int, path: Path) -> dict[str, float]:
    """One store, one workload; every figure in seconds unless named otherwise."""
    if kind == "old":
        from polyarch.coordinator import model
        from polyarch.coordinator.store import SQLiteStore as OldStore

        store: Any = OldStore(path)
        batches: list[int] = []
    else:
        from polyarch.coordinator.core import model
        from polyarch.coordinator.core.sqlite_store import SQLiteStore

        batches = []
        store = SQLiteStore(path, observe_batch=batches.append)

    latencies: list[float] = []  # the store call until durable
    rpc_latencies: list[float] = []  # from the RPC's arrival, waiting for the loop included
    lags: list[float] = []
    on_loop = 0.0  # time spent inside store calls, on the event loop thread
    running = True

    async def write(call: Callable[[], Any]) -> None:
        """One RPC: it arrives, waits for the loop, writes, and answers once durable."""
        nonlocal on_loop
        arrived = time.perf_counter()
        await asyncio.sleep(0)  # other handlers run first
        began = time.perf_counter()
        pending = call()
        on_loop += time.perf_counter() - began
        if pending is not None:
            await pending
        durable = time.perf_counter()
        latencies.append(durable - began)
        rpc_latencies.append(durable - arrived)

    async def probe() -> None:
        while running:
            began = time.perf_counter()
            await asyncio.sleep(PROBE_INTERVAL)
            lags.append(time.perf_counter() - began - PROBE_INTERVAL)

    async def lifecycle(i: int) -> None:
        spec = model.BuildSpec(
            context_digest="sha256:" + "a" * 64, dockerfile="Dockerfile",
            platforms=["linux/amd64", "linux/arm64"], tags=[f"127.0.0.1:5000/bench/app:{i}"],
            registry="127.0.0.1:5000", repository="bench/app",
        )  # fmt: skip
        build = model.BuildRecord(
            id=f"b{i}", spec=spec, created_at=float(i), idempotency_key=f"k{i}"
        )
        jobs = [
            model.JobRecord(id=f"b{i}-{p}", build_id=build.id, platform=p, queued_at=float(i))
            for p in spec.platforms
        ]
        await write(lambda: store.create_build(build, jobs))
        build.state = model.BuildState.RUNNING
        await write(lambda: store.save_build(build))
        for job in jobs:
            for state in ("assigned", "running", "running", "pushed"):
                job.state, job.agent = model.JobState(state), "agent-1"
                await write(lambda j=job, s=state: store.save_job(j, s, time.time()))
        build.state = model.BuildState.SUCCEEDED
        await write(lambda: store.save_build(build))

    async def worker(queue: asyncio.Queue[int]) -> None:
        while not queue.empty():
            await lifecycle(queue.get_nowait())

    work: asyncio.Queue[int] = asyncio.Queue()
    for i in range(builds):
        work.put_nowait(i)
    probing = asyncio.create_task(probe())
    began = time.perf_counter()
    await asyncio.gather(*(worker(work) for _ in range(tasks)))
    elapsed = time.perf_counter() - began
    running = False
    await probing
    closing = store.close()
    if closing is not None:
        await closing
    writes = len(latencies)
    return {
        "writes": writes,
        "seconds": elapsed,
        "writes_per_s": writes / elapsed,
        "commits": len(batches) if kind == "new" else writes,  # old: one commit per write
        "on_loop_per_write": on_loop / writes,
        "latency_p50": quantile(latencies, 0.5),
        "latency_p99": quantile(latencies, 0.99),
        "rpc_p50": quantile(rpc_latencies, 0.5),
        "rpc_p99": quantile(rpc_latencies, 0.99),
        "lag_p50": quantile(lags, 0.5),
        "lag_p99": quantile(lags, 0.99),
        "lag_max": max(lags, default=0.0),
    }


def child(kind: str, builds: int, tasks: int, directory: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="store-bench-", dir=directory) as work:
        figures = asyncio.run(drive(kind, builds, tasks, Path(work) / "state.sqlite3"))
    print(json.dumps(figures))


def run_child(kind: str, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ)
    if kind == "old":
        env["PYTHONPATH"] = args.before
    command = [sys.executable, __file__, "--child", kind, "--builds", str(args.builds),
               "--tasks", str(args.tasks)] + (["--dir", args.dir] if args.dir else [])  # fmt: skip
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    figures: dict[str, float] = json.loads(out.splitlines()[-1])
    return figures


ROWS = [
    ("writes", "writes", 1.0, "{:.0f}"),
    ("writes/s", "writes_per_s", 1.0, "{:.0f}"),
    ("commits", "commits", 1.0, "{:.0f}"),
    ("on loop per write (us)", "on_loop_per_write", 1e6, "{:.1f}"),
    ("write latency p50 (ms)", "latency_p50", 1e3, "{:.2f}"),
    ("write latency p99 (ms)", "latency_p99", 1e3, "{:.2f}"),
    ("rpc latency p50 (ms)", "rpc_p50", 1e3, "{:.2f}"),
    ("rpc latency p99 (ms)", "rpc_p99", 1e3, "{:.2f}"),
    ("loop lag p50 (ms)", "lag_p50", 1e3, "{:.2f}"),
    ("loop lag p99 (ms)", "lag_p99", 1e3, "{:.2f}"),
    ("loop lag max (ms)", "lag_max", 1e3, "{:.2f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the database goes (a real disk)")
    parser.add_argument("--before", default="/tmp/beforeshim",
                        help="PYTHONPATH under which polyarch is the old tree")  # fmt: skip
    parser.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.builds, args.tasks, args.dir)
        return
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for kind in ("old", "new"):
            results[kind].append(run_child(kind, args))
    print(f"{args.builds} builds x 11 writes, {args.tasks} tasks, median of {args.rounds} rounds")
    print(f"{'':26}{'old (sync)':>14}{'new (thread)':>14}{'new/old':>10}")
    for label, key, scale, form in ROWS:
        old = statistics.median(r[key] for r in results["old"])
        new = statistics.median(r[key] for r in results["new"])
        ratio = f"{new / old:.3g}" if old else "-"
        print(f"{label:26}{form.format(old * scale):>14}{form.format(new * scale):>14}{ratio:>10}")


if __name__ == "__main__":
    main()

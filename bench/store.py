"""The state store alone: SQLite (writer thread, group commit) and PostgreSQL side by side.

Each round runs every store named by --kinds, alternating, each in its own process: "new"
is the SQLite store on a file on disk, "postgres" the PostgreSQL store on a fresh database
of one local server this run starts (tests/support/postgres.py: 127.0.0.1, fsync on, its
data in /tmp), "old" the synchronous SQLite store of the tree before commit e7568a3
(importable through --before). K asyncio tasks drive N build lifecycles (create_build, then
8 save_job and 2 save_build), each write an RPC of its own: it yields to the loop, writes,
and awaits durability. "write latency" is the store call until durable; "rpc latency" adds
the wait for a busy loop. A probe task sleeps 1 ms in a loop and records how late it wakes:
the event loop's lag (the PostgreSQL writer is a task on the loop, so its work shows there).

    PYTHONPATH=/tmp/shim .venv/bin/python bench/store.py --builds 300 --tasks 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


async def drive(kind: str, builds: int, tasks: int, path: Path, dsn: str) -> dict[str, float]:
    """One store, one workload; every figure in seconds unless named otherwise."""
    if kind == "postgres":
        from polyarch.coordinator.core import model
        from polyarch.coordinator.core.postgres_store import PostgresStore

        batches = []
        store = await PostgresStore.open(dsn, observe_batch=batches.append)
    elif kind == "old":
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
        "commits": len(batches) if kind != "old" else writes,  # old: one commit per write
        "on_loop_per_write": on_loop / writes,
        "latency_p50": quantile(latencies, 0.5),
        "latency_p99": quantile(latencies, 0.99),
        "rpc_p50": quantile(rpc_latencies, 0.5),
        "rpc_p99": quantile(rpc_latencies, 0.99),
        "lag_p50": quantile(lags, 0.5),
        "lag_p99": quantile(lags, 0.99),
        "lag_max": max(lags, default=0.0),
    }


def child(kind: str, builds: int, tasks: int, directory: str | None, dsn: str) -> None:
    with tempfile.TemporaryDirectory(prefix="store-bench-", dir=directory) as work:
        figures = asyncio.run(drive(kind, builds, tasks, Path(work) / "state.sqlite3", dsn))
    print(json.dumps(figures))


def run_child(kind: str, args: argparse.Namespace, dsn: str) -> dict[str, float]:
    env = dict(os.environ)
    if kind == "old":
        env["PYTHONPATH"] = args.before
    command = [sys.executable, __file__, "--child", kind, "--builds", str(args.builds),
               "--tasks", str(args.tasks), "--dsn", dsn]  # fmt: skip
    command += ["--dir", args.dir] if args.dir else []
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    figures: dict[str, float] = json.loads(out.splitlines()[-1])
    return figures


TITLES = {"old": "old (sync)", "new": "sqlite (thread)", "postgres": "postgresql"}
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
    parser.add_argument("--kinds", default="new,postgres",
                        help="stores to compare (old, new, postgres); the first is the "
                        "reference of the ratios")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    parser.add_argument("--child", choices=list(TITLES), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.builds, args.tasks, args.dir, args.dsn)
        return
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in TITLES for k in kinds):
        parser.error(f"--kinds: a comma-separated list of {', '.join(TITLES)}")
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    with contextlib.ExitStack() as stack:
        server = None
        if "postgres" in kinds:  # one local server for the run (tests/support/postgres.py)
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.support.postgres import running_postgres

            server = stack.enter_context(running_postgres())
        for round_number in range(args.rounds):
            for kind in kinds:
                # a fresh database per round: no round reads another's rows
                dsn = (
                    server.create_database(f"bench_{round_number}")
                    if kind == "postgres" and server
                    else ""
                )
                results[kind].append(run_child(kind, args, dsn))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{args.builds} builds x 11 writes, {args.tasks} tasks, median of {args.rounds} rounds")
    first = kinds[0]
    short = {"old": "old", "new": "sqlite", "postgres": "pg"}
    ratios = [f"{short[k]}/{short[first]}" for k in kinds[1:]]
    print(f"{'':26}" + "".join(f"{TITLES[k]:>16}" for k in kinds)
          + "".join(f"{r:>15}" for r in ratios))  # fmt: skip
    for label, key, scale, form in ROWS:
        medians = {k: statistics.median(r[key] for r in results[k]) for k in kinds}
        cells = "".join(f"{form.format(medians[k] * scale):>16}" for k in kinds)
        cells += "".join(
            f"{medians[k] / medians[first]:>15.3g}" if medians[first] else f"{'-':>15}"
            for k in kinds[1:]
        )
        print(f"{label:26}{cells}")


if __name__ == "__main__":
    main()

"""Runs one coordinator for bench/load.py: no registry work, plus an event-loop lag probe.

Started as a subprocess with PYTHONPATH pointing at a shim for the tree under test, so it
imports only public entry points that both layouts share: Coordinator, CoordinatorConfig,
IndexPublisher and IndexResult (which moved from polyarch.coordinator.{assembly,index} to
polyarch.coordinator.registry.{assembly,index}).

Protocol with the harness: once listening it writes {"pid", "port", "metrics_port"} to
--ready-file (atomically). SIGUSR1 clears the lag samples (the harness sends it when a
scenario starts, so start-up does not count). SIGTERM or SIGINT stops the coordinator and
writes the lag percentiles to --lag-file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib
import json
import logging
import os
import pkgutil
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
PR_SET_PDEATHSIG = 1


def skip_registry_work() -> None:
    """Replaces IndexPublisher.publish with an instant synthetic index: the load test measures
    the coordinator core, not a registry (that is what the integration tests are for)."""
    try:
        from polyarch.coordinator.registry.assembly import IndexPublisher
        from polyarch.coordinator.registry.index import IndexResult
    except ImportError:  # the flat layout of before commit e7568a3
        from polyarch.coordinator.assembly import IndexPublisher  # type: ignore[no-redef]
        from polyarch.coordinator.index import IndexResult  # type: ignore[no-redef]

    async def publish(self: Any, spec: Any, jobs: Any, *args: Any, **kwargs: Any) -> Any:
        return IndexResult(
            digest="sha256:" + secrets.token_hex(32), media_type=OCI_INDEX, size=512, children=()
        )

    IndexPublisher.publish = publish  # type: ignore[method-assign]


def import_coordinator() -> tuple[Any, str]:
    """The Coordinator class, and a note when the tree needed help importing it.

    A tree mid-rewrite may hold an import cycle that only bites when server.py is imported
    first (e7568a3 does: core.ledger -> wire.convert -> core.fleet -> core.ledger). Then every
    coordinator submodule is imported once, in walk order and ignoring failures, which
    completes the cycle from another entry, and server.py is imported again."""
    try:
        from polyarch.coordinator.server import Coordinator

        return Coordinator, ""
    except ImportError as exc:
        if "circular import" not in str(exc):
            raise
        note = f"import cycle worked around: {exc}"
    logging.getLogger(__name__).warning("%s", note)
    import polyarch.coordinator as package

    for module in pkgutil.walk_packages(package.__path__, "polyarch.coordinator."):
        with contextlib.suppress(ImportError):
            importlib.import_module(module.name)
    from polyarch.coordinator.server import Coordinator

    return Coordinator, note


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max in milliseconds of samples in seconds."""
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "count": len(ordered),
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "p999_ms": at(0.999),
        "max_ms": ordered[-1] * 1000,
    }


async def probe_loop_lag(samples: list[float], period: float) -> None:
    """Sleeps `period` again and again and records how late the loop woke it: a heartbeat
    (or any agent message) waits about this long before the coordinator handles it."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(period)
        samples.append(max(0.0, loop.time() - asked - period))


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


def die_with_parent() -> None:
    """SIGTERM when the harness dies, even by SIGKILL: no coordinator outlives its run."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def run(args: argparse.Namespace) -> int:
    die_with_parent()
    coordinator_class, note = import_coordinator()
    from polyarch.coordinator.config import CoordinatorConfig

    skip_registry_work()
    config = CoordinatorConfig(
        listen="127.0.0.1:0",
        data_dir=args.data_dir,
        insecure=True,
        metrics_listen="127.0.0.1:0",
        agent_timeout=args.agent_timeout,
    )
    coordinator = coordinator_class(config)
    await coordinator.start()
    samples: list[float] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, samples.clear)
    probe = asyncio.create_task(probe_loop_lag(samples, args.probe_ms / 1000), name="lag-probe")
    write_atomically(
        args.ready_file,
        {
            "pid": os.getpid(),
            "port": coordinator.port,
            "metrics_port": coordinator.metrics_port,
            "note": note,
        },
    )
    try:
        await stop.wait()
    finally:
        probe.cancel()
        write_atomically(args.lag_file, {"probe_ms": args.probe_ms, **percentiles(samples)})
        await coordinator.stop(grace=1.0)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--lag-file", type=Path, required=True)
    parser.add_argument("--agent-timeout", type=float, default=10.0)
    parser.add_argument("--probe-ms", type=float, default=5.0, help="the lag probe's sleep")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )  # fmt: skip
    profile_to = os.environ.get("POLYARCH_LOAD_PROFILE")
    if not profile_to:
        return asyncio.run(run(args))
    # cProfile of the event loop's thread (where every RPC and state change runs), for
    # finding where a job's CPU goes: POLYARCH_LOAD_PROFILE=/tmp/coordinator.prof
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(asyncio.run, run(args))
    finally:
        profiler.dump_stats(profile_to)


if __name__ == "__main__":
    sys.exit(main())

"""Coordinator load harness (issue 11): fake agents, real gRPC clients, one or two trees.

For each tree (`--tree DIR`, repeatable: the first is "before", the last "after") and each
scenario it starts a fresh coordinator (bench/load_coordinator.py, --insecure on 127.0.0.1,
registry work replaced by a synthetic index) and a fleet of fake agents speaking the real
agent protocol (bench/load_agents.py) in their own processes, then submits builds from this
process with `--clients` concurrent gRPC clients and reports the figures of bench/README.md.

    .venv/bin/python bench/load.py --quick --tree /work/before --tree .
    .venv/bin/python bench/load.py --tree /work/before --json /tmp/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_report import Scenario, figures_of, print_side_by_side, print_tree

HERE = Path(__file__).resolve().parent
PACKAGES = ("agent", "coordinator", "proto", "client")
AGENTS_PER_PROCESS = 500
CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_shim(tree: Path, into: Path) -> Path:
    """A PYTHONPATH entry that imports `polyarch.*` from the tree's top-level folders."""
    package = into / "polyarch"
    package.mkdir(parents=True)
    for name in PACKAGES:
        (package / name).symlink_to(tree.resolve() / name)
    return into


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Children:
    """The subprocesses of one scenario; `stop_all` ends each by its PID, SIGKILL after a
    deadline, so neither an error nor Ctrl-C leaves one behind."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, args: list[str], shim: Path, log: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(shim), "PYTHONUNBUFFERED": "1"}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], deadline: float = 15.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(deadline)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, deadline=5.0)


async def wait_for_file(path: Path, proc: subprocess.Popen[bytes], seconds: float) -> Any:
    """The JSON a child writes when ready; fails fast if the child exits first."""
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(path.exists):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[1]} exited with {proc.returncode} before ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args[1]} not ready within {seconds:g} s")
        await asyncio.sleep(0.05)
    return await asyncio.to_thread(read_json, path)


def read_json(path: Path) -> Any:
    """A child's JSON file; {} when the child never wrote it (it was killed)."""
    return json.loads(path.read_text()) if path.exists() else {}


def tail_of(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def tiny_context() -> tuple[bytes, str]:
    """A build context tar with one Dockerfile, and its digest."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"FROM scratch\nCOPY Dockerfile /\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    packed = buffer.getvalue()
    return packed, "sha256:" + hashlib.sha256(packed).hexdigest()


def scrape(metrics_port: int) -> dict[str, float]:
    """Sums of the coordinator's counters that the report needs, by family name."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


class Client:
    """The build API side: upload once, submit with N concurrent clients, watch completion."""

    def __init__(self, address: str, clients: int) -> None:
        import grpc

        from polyarch.proto.v1 import build_pb2, build_pb2_grpc, common_pb2

        self.pb, self.common = build_pb2, common_pb2
        self.channels = [grpc.aio.insecure_channel(address) for _ in range(clients)]
        self.stubs = [build_pb2_grpc.BuildServiceStub(c) for c in self.channels]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def upload(self) -> str:
        packed, digest = tiny_context()
        chunk = self.common.ContextChunk(digest=digest, size=len(packed), data=packed)

        async def chunks() -> Any:
            yield chunk

        await self.stubs[0].UploadContext(chunks())
        return digest

    async def submit_all(
        self, digest: str, builds: int, platforms: list[str], rate: float = 0.0
    ) -> list[tuple[str, float, float]]:
        """(build id, send time, answer time) per build, CLOCK_MONOTONIC, in send order.
        With a rate, submit i is sent no earlier than i / rate seconds after the first."""
        sent: list[tuple[str, float, float]] = []
        counter = iter(range(builds))
        began = time.monotonic()

        async def one_client(stub: Any) -> None:
            for i in counter:
                if rate:
                    await asyncio.sleep(max(0.0, began + i / rate - time.monotonic()))
                request = self.pb.SubmitBuildRequest(
                    context_digest=digest, platforms=platforms,
                    tags=[f"127.0.0.1:5000/load/bench:b{i}"],
                )  # fmt: skip
                start = time.monotonic()
                response = await stub.SubmitBuild(request)
                sent.append((response.build.id, start, time.monotonic()))

        await asyncio.gather(*(one_client(stub) for stub in self.stubs))
        return sorted(sent, key=lambda item: item[1])

    async def finished_builds(self) -> list[Any]:
        builds: list[Any] = []
        token = ""
        while True:
            request = self.pb.ListBuildsRequest(limit=200, page_size=200, page_token=token)
            response = await self.stubs[0].ListBuilds(request)
            builds.extend(response.builds)
            token = response.next_page_token
            if not token or not response.builds:
                return builds


async def wait_until_finished(metrics_port: int, builds: int, seconds: float) -> float | None:
    """Polls the builds-finished counter (cheap: one scrape) until every build ended; the
    monotonic time it saw that, or None at the deadline."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        finished = await asyncio.to_thread(scrape, metrics_port)
        if finished.get("polyarch_builds_finished_total", 0) >= builds:
            return time.monotonic()
        # each scrape costs the coordinator CPU (more than a job does): seconds apart keeps it
        # out of the figures; the makespan comes from the builds' own finished_at, not this poll
        await asyncio.sleep(5.0)
    return None


async def run_scenario(
    tree: Path, shim: Path, scenario: Scenario, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    children = Children()
    ready, lag, out = work / "coordinator.json", work / "lag.json", work / "agents-{}.json"
    try:
        coordinator = children.start(
            [str(HERE / "load_coordinator.py"), "--data-dir", str(work / "data"),
             "--ready-file", str(ready), "--lag-file", str(lag),
             "--log-level", args.log_level],
            shim, work / "coordinator.log",
        )  # fmt: skip
        info = await wait_for_file(ready, coordinator, 60)
        pid, address = info["pid"], f"127.0.0.1:{info['port']}"
        await asyncio.sleep(0.5)  # let start-up allocations settle before the baseline
        rss_before = rss_kib(pid)
        fleets = []
        per_process = math.ceil(scenario.agents / args.agent_processes)
        for n, first in enumerate(range(0, scenario.agents, per_process)):
            count = min(per_process, scenario.agents - first)
            proc = children.start(
                [str(HERE / "load_agents.py"), "--address", address, "--first", str(first),
                 "--count", str(count), "--slots", str(scenario.slots), "--fleet", args.fleet,
                 "--job-seconds", str(scenario.job_seconds),
                 "--ready-file", str(work / f"fleet-{n}.json"), "--out", str(out).format(n)],
                shim, work / f"agents-{n}.log",
            )  # fmt: skip
            fleets.append(proc)
        for n, proc in enumerate(fleets):
            await wait_for_file(work / f"fleet-{n}.json", proc, 60 + scenario.agents / 20)
        rss_after = rss_kib(pid)
        client = Client(address, args.clients)
        try:
            digest = await client.upload()
            os.kill(pid, signal.SIGUSR1)  # the lag probe starts counting now

            def cpu_now() -> dict[str, float]:
                agents = sum(cpu_seconds(proc.pid) for proc in fleets)
                return {
                    "coordinator": cpu_seconds(pid),
                    "harness": own_cpu_seconds(),
                    "agents": agents,
                }

            cpu_start = cpu_now()
            wall_start, mono_start = time.time(), time.monotonic()
            sent = await client.submit_all(
                digest, scenario.builds, scenario.platforms, scenario.rate
            )
            submitted, cpu_submitted = time.monotonic(), cpu_now()
            budget = args.timeout or max(120.0, 5 * scenario.ideal_makespan)
            done_at = await wait_until_finished(info["metrics_port"], scenario.builds, budget)
            end = done_at or time.monotonic()
            cpu_end = cpu_now()
            counters = await asyncio.to_thread(scrape, info["metrics_port"])
            builds = await client.finished_builds()
        finally:
            await client.close()
        for proc in fleets:
            children.stop(proc)
        reports = [
            await asyncio.to_thread(read_json, Path(str(out).format(n))) for n in range(len(fleets))
        ]
        children.stop(coordinator)
        lag_report = await asyncio.to_thread(read_json, lag)
    finally:
        children.stop_all()
    figures = figures_of(
        scenario, sent=sent, reports=reports, builds=builds, lag=lag_report, counters=counters,
        cpu={k: cpu_end[k] - v for k, v in cpu_start.items()},
        cpu_submitting={k: cpu_submitted[k] - v for k, v in cpu_start.items()},
        rss=(rss_before, rss_after),
        times={"wall_start": wall_start, "mono_start": mono_start, "submitted": submitted,
               "end": end, "finished": done_at is not None},
    )  # fmt: skip
    if info.get("note"):
        figures["note"] = info["note"]
    return figures


def scenarios_of(args: argparse.Namespace) -> list[Scenario]:
    agents = args.agents or (20 if args.quick else 100)
    builds = args.builds or 20 * agents
    queue_seconds = args.job_seconds if args.job_seconds is not None else 1.0 if args.quick else 2.0
    wanted = {
        "idle": Scenario("idle", agents, args.slots, builds, ["linux/amd64"], 0.0),
        "paced": Scenario(
            "paced", agents, args.slots, builds, ["linux/amd64"], 0.0, rate=args.rate
        ),
        "queue": Scenario(
            "queue", agents, args.slots, builds, ["linux/amd64", "linux/arm64"], queue_seconds
        ),
    }
    return [
        wanted[name]
        for name in (["idle", "paced", "queue"] if args.scenario == "all" else [args.scenario])
    ]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    # the data dir lives here too: SQLite commits with synchronous=FULL, so a slow fsync
    # shows in submit latency; --data-root /dev/shm takes the disk out of the figures
    with tempfile.TemporaryDirectory(prefix="polyarch-load-", dir=args.data_root) as tmp:
        shims = {
            str(tree): make_shim(tree, Path(tmp) / f"shim-{i}") for i, tree in enumerate(args.tree)
        }
        sys.path.insert(0, str(next(iter(shims.values()))))  # the protocol is the same in both
        for i, tree in enumerate(args.tree):
            results[str(tree)] = {}
            for scenario in scenarios_of(args):
                work = Path(tmp) / f"run-{i}-{scenario.name}"
                work.mkdir()
                print(f"# {tree}: {scenario.describe()}", file=sys.stderr, flush=True)
                try:
                    figures = await run_scenario(tree, shims[str(tree)], scenario, args, work)
                except Exception as exc:  # one broken tree must not hide the other's figures
                    logs = sorted(str(p) for p in work.glob("*.log"))
                    tails = {p: await asyncio.to_thread(tail_of, Path(p)) for p in logs}
                    figures = {"error": f"{type(exc).__name__}: {exc}", "log_tails": tails}
                    print(f"# {tree} {scenario.name} failed: {exc}", file=sys.stderr)
                    for name, tail in tails.items():
                        print(f"## {name}\n{tail}", file=sys.stderr)
                results[str(tree)][scenario.name] = figures
                print_tree(str(tree), scenario.name, figures)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--tree", type=Path, action="append", help="a source tree (repeat: before, after)")
    add("--scenario", choices=["idle", "paced", "queue", "all"], default="all")
    add("--rate", type=float, default=500.0,
        help="submits/s of the paced scenario (goal 2: dispatch at goal 1's rate)")  # fmt: skip
    add("--quick", action="store_true", help="20 agents, 400 builds, 1 s jobs")
    add("--agents", type=int, help="fake agents (default 100; 20 with --quick)")
    add("--slots", type=int, default=2, help="slots per agent")
    add("--builds", type=int, help="builds per scenario (default 20 per agent)")
    add("--job-seconds", type=float, help="job duration of the queue scenario (default 2)")
    add("--clients", type=int, default=16, help="concurrent gRPC clients")
    add("--fleet", choices=["both", "split"], default="both",
        help="both: every agent native amd64+arm64; split: half amd64, half arm64")  # fmt: skip
    add("--agent-processes", type=int, help=f"default: one per {AGENTS_PER_PROCESS} agents")
    add("--timeout", type=float, help="seconds to wait for completion (default 5x ideal)")
    add("--data-root", type=Path, help="where the temporary data dirs go (default: $TMPDIR)")
    add("--log-level", default="INFO", help="the coordinator's log level (logs to a file)")
    add("--json", type=Path, metavar="FILE", help="write every figure here")
    args = parser.parse_args()
    args.tree = args.tree or [HERE.parent]
    if args.agent_processes is None:
        args.agent_processes = math.ceil((args.agents or 100) / AGENTS_PER_PROCESS)
    try:
        results = asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("interrupted: subprocesses stopped", file=sys.stderr)
        return 130
    print_side_by_side(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    # Ctrl-C even when started with SIGINT ignored (`cmd &` in a script), and SIGTERM alike:
    # both raise KeyboardInterrupt, whose unwinding stops every subprocess by its PID
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())

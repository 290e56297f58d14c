"""A warm rebuild through a registry cache on another agent against a cold build (buildah).

Per round, on a real farm on 127.0.0.1 (a coordinator in this process, a registry, and
`polyarch agent --builder buildah --storage-dir DIR` processes, each with a fresh storage,
so no agent has a local layer of the build):

1. seed: agent A builds with `--cache-to type=registry,ref=CACHE,mode=max`;
2. warm: agent B builds the same context with `--cache-from type=registry,ref=CACHE`;
3. cold: agent C builds the same context with no cache.

Only one agent is connected per build, so each build lands where it should. Warm and cold
alternate which goes first. The RUN step is a busybox shell loop (`--loop` iterations; the
default costs a few seconds here) with a fresh nonce per round, so no round reuses another's
layers. Times are the `polyarch build` client's wall clock; each warm log must show the RUN
step taken from the cache and each cold one must not, or the run stops.

    .venv/bin/python bench/cache_rebuild.py [--rounds 3] [--loop 1500000] [--json FILE]

The docker backend is not measured: every docker agent on a host drives the one dockerd,
whose own build cache serves a rebuild whatever the registry holds (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polyarch.proto.trust import Role
from tests.support import services
from tests.support.farm import POLYARCH, Farm, running_farm
from tests.support.poll import poll_until

DOCKERFILE = """\
ARG BASE
FROM ${{BASE}}
RUN echo "{nonce}" > /nonce && i=0; while [ $i -lt {loop} ]; do i=$((i+1)); done
COPY greeting.txt /greeting.txt
"""


def connected(farm: Farm, name: str) -> bool:
    manager = farm.coordinator.manager
    assert manager is not None
    return any(session.name == name for session in manager.sessions.values())


async def start_agent(farm: Farm, name: str, work: Path) -> asyncio.subprocess.Process:
    """A real `polyarch agent` process: buildah, linux/amd64, its own storage under work."""
    log = (work / f"agent-{name}.log").open("wb")
    env = dict(os.environ, POLYARCH_TOKEN=farm.token(Role.AGENT))
    proc = await asyncio.create_subprocess_exec(
        POLYARCH, "agent", "--coordinator", farm.address, "--name", name, "--replace",
        "--builder", "buildah", "--native", "linux/amd64", "--emulated", "none", "--slots", "1",
        "--work-dir", str(work / name), "--storage-dir", str(work / name / "storage"),
        stdout=log, stderr=log, env=env,
    )  # fmt: skip
    log.close()
    farm.processes.append(proc)  # killed by running_farm if the bench stops early
    await poll_until(lambda: connected(farm, name), timeout=60, message=f"{name} connected")
    return proc


async def stop_agent(farm: Farm, name: str, proc: asyncio.subprocess.Process) -> None:
    proc.terminate()
    await proc.wait()
    await poll_until(lambda: not connected(farm, name), timeout=60, message=f"{name} gone")


def run_step_cached(log: str) -> bool:
    """Whether buildah said `Using cache` under the RUN step (as the integration tests read)."""
    lines = [line.partition("] ")[2] for line in log.splitlines() if line.startswith("[linux/")]
    at = next(i for i, line in enumerate(lines) if "RUN echo" in line)
    following = lines[at + 1 :]
    until = next((i for i, line in enumerate(following) if line.startswith("STEP ")), None)
    return any("Using cache" in line for line in following[:until])


async def timed_build(
    farm: Farm, work: Path, agent: str, tag: str, base: str, context: Path, *cache: str
) -> tuple[float, bool]:
    """(seconds, RUN step cached) of one build on `agent`, the only agent connected."""
    proc = await start_agent(farm, agent, work)
    try:
        began = time.perf_counter()
        done = await farm.cli("build", "--platform", "linux/amd64", "-t", tag,
                              "--progress", "plain", "--build-arg", f"BASE={base}", *cache,
                              str(context))  # fmt: skip
        seconds = time.perf_counter() - began
    finally:
        await stop_agent(farm, agent, proc)
    if done.returncode != 0:
        raise SystemExit(f"build on {agent} failed:\n{done.stderr[-4000:]}")
    return seconds, run_step_cached(done.stderr)


async def one_round(
    farm: Farm, work: Path, n: int, base: str, registry: str, loop: int
) -> dict[str, float]:
    context = work / f"context-{n}"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE.format(nonce=secrets.token_hex(8), loop=loop))
    (context / "greeting.txt").write_text("hello\n")
    cache, repo = f"{registry}/bench/cache-{n}", f"{registry}/bench/app-{n}"
    seed, cached = await timed_build(
        farm, work, f"a{n}", f"{repo}:seed", base, context,
        "--cache-to", f"type=registry,ref={cache}:buildcache,mode=max",
    )  # fmt: skip
    assert not cached, "the seed build found its RUN step cached"
    runs = {
        "warm": (f"b{n}", "--cache-from", f"type=registry,ref={cache}:buildcache"),
        "cold": (f"c{n}",),
    }
    order = ["warm", "cold"] if n % 2 == 0 else ["cold", "warm"]
    result = {"seed_s": seed}
    for kind in order:
        agent, *cache_flags = runs[kind]
        seconds, cached = await timed_build(
            farm, work, agent, f"{repo}:{kind}", base, context, *cache_flags
        )
        if cached != (kind == "warm"):
            raise SystemExit(f"round {n}: the {kind} build {'hit' if cached else 'missed'} "
                             "the cache")  # fmt: skip
        result[f"{kind}_s"] = seconds
    result["warm/cold"] = result["warm_s"] / result["cold_s"]
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", type=int, default=1_500_000,
                        help="iterations of the RUN step's shell loop (its cost)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="polyarch-cache-bench-") as tmp:
        work = Path(tmp)
        with services.running_registry(work / "registry") as registry:
            base = services.build_base_image(registry.address)
            async with running_farm(work / "farm") as farm:
                rounds = []
                print(f"buildah, linux/amd64, RUN loop {args.loop}; seconds per build")
                print(f"{'round':>5} {'seed(A)':>8} {'warm(B)':>8} {'cold(C)':>8} {'warm/cold':>9}")
                for n in range(args.rounds):
                    r = await one_round(farm, work, n, base, registry.address, args.loop)
                    rounds.append(r)
                    print(f"{n + 1:>5} {r['seed_s']:8.2f} {r['warm_s']:8.2f} {r['cold_s']:8.2f} "
                          f"{r['warm/cold']:9.2f}")  # fmt: skip
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"{'median':>6} {median['seed_s']:7.2f} {median['warm_s']:8.2f} "
          f"{median['cold_s']:8.2f} {median['warm/cold']:9.2f}")  # fmt: skip
    print(f"ratio of the medians warm/cold: {median['warm_s'] / median['cold_s']:.2f}")
    if args.json:
        summary = {"backend": "buildah", "loop": args.loop, "rounds": rounds, "median": median}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())

"""Shared harness of the publishing-cost benchmarks: one 3-platform build per mode, alternated.

One coordinator with one real docker agent (amd64 native, arm64 and arm/v7 under QEMU) on
127.0.0.1 and a local registry; rounds alternate the modes so drift hits each alike, after one
warm-up build (base image pulls and QEMU start-up count for no mode). Reports the median wall
time of the whole `polyarch build` and of index assembly alone, timed around
IndexPublisher.publish in this process. Used by provenance_cost.py and sign_cost.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polyarch.agent.builders.docker import DockerBuilder
from polyarch.coordinator.server import Coordinator, CoordinatorConfig
from tests.support import services
from tests.support.farm import Farm

DOCKERFILE = "ARG BASE=scratch\nFROM ${BASE}\nARG NONCE=0\nRUN echo $NONCE > /nonce\n"
PLATFORMS = "linux/amd64,linux/arm64,linux/arm/v7"


def parse_args(doc: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--builds", type=int, default=5, help="per mode")
    parser.add_argument("--json", metavar="FILE", help="every figure")
    return parser.parse_args()


async def compare(
    label: str,
    modes: Sequence[str],
    flags: Callable[[str, Path], list[str]],
    args: argparse.Namespace,
    work: Path,
) -> Mapping[str, dict[str, list[float]]]:
    """Builds `args.builds` rounds of every mode (`flags(mode, work)` are its extra `polyarch
    build` flags), prints the medians under `label` and writes every figure to `args.json`."""
    with services.running_registry(work / "registry") as registry:
        base = services.build_base_image(registry.address)
        context = work / "ctx"
        context.mkdir()
        (context / "Dockerfile").write_text(DOCKERFILE)
        config = CoordinatorConfig(listen="127.0.0.1:0", data_dir=work / "coordinator",
                                   metrics_listen="", insecure=True)  # fmt: skip
        coordinator = Coordinator(config)
        await coordinator.start()
        farm = Farm(coordinator, work)
        await farm.add_agent(
            "a", DockerBuilder(services.docker_binary()), native=["linux/amd64"],
            emulated=["linux/arm64", "linux/arm/v7"], slots=3,
        )  # fmt: skip
        publisher = coordinator._publisher
        assert publisher is not None
        publish = publisher.publish
        assembly: list[float] = []

        async def timed(*a: Any, **kw: Any) -> Any:
            began = time.perf_counter()
            try:
                return await publish(*a, **kw)
            finally:
                assembly.append(time.perf_counter() - began)

        publisher.publish = timed  # type: ignore[method-assign]
        walls: dict[str, list[float]] = {m: [] for m in modes}
        assemblies: dict[str, list[float]] = {m: [] for m in modes}
        rounds = [(-1, modes[0])] + [(n, m) for n in range(args.builds) for m in modes]
        for n, mode in rounds:
            began = time.perf_counter()
            slug = mode.replace("=", "-")
            done = await farm.cli(
                "build", "--platform", PLATFORMS, "--progress", "quiet",
                "-t", f"{registry.address}/bench/{label}:r{n}-{slug}", *flags(mode, work),
                "--build-arg", f"BASE={base}",
                "--build-arg", f"NONCE={secrets.token_hex(8)}", str(context),
            )  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"build failed: {done.stderr}")
            if n >= 0:
                walls[mode].append(time.perf_counter() - began)
                assemblies[mode].append(assembly[-1])
        print(f"{label:12} {'build median':>13} {'assembly median':>16}  (n={args.builds})")
        for mode in modes:
            print(f"{mode:12} {statistics.median(walls[mode]):12.2f}s "
                  f"{statistics.median(assemblies[mode]) * 1e3:14.1f}ms")  # fmt: skip
        figures = {"build_seconds": walls, "assembly_seconds": assemblies}
        if args.json:
            text = json.dumps({"platforms": PLATFORMS, **figures}, indent=2)
            await asyncio.to_thread(Path(args.json).write_text, text)
        await farm.stop_agent("a")
        await coordinator.stop(grace=1)
        return figures

"""What cosign signing costs on a 3-platform build: --sign-key against no signature.

One coordinator with one real docker agent (amd64 native, arm64 and arm/v7 under QEMU) on
127.0.0.1 and a local registry; provenance at its default (mode=min) in both; rounds
alternate signed and unsigned so drift hits both alike. Reports the median wall time of the
whole `polyarch build` and of index assembly alone (verify, attest, push by digest, sign,
push the tags), timed around IndexPublisher.publish in this process.

    .venv/bin/python bench/sign_cost.py --builds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from polyarch.agent.builders.docker import DockerBuilder
from polyarch.coordinator.server import Coordinator, CoordinatorConfig
from tests.support import services
from tests.support.farm import Farm

DOCKERFILE = "ARG BASE=scratch\nFROM ${BASE}\nARG NONCE=0\nRUN echo $NONCE > /nonce\n"
PLATFORMS = "linux/amd64,linux/arm64,linux/arm/v7"
MODES = ("unsigned", "signed")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--builds", type=int, default=5, help="per mode")
    parser.add_argument("--json", metavar="FILE", help="every figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with services.running_registry(work / "registry") as registry:
            base = services.build_base_image(registry.address)
            context = work / "ctx"
            context.mkdir()
            (context / "Dockerfile").write_text(DOCKERFILE)
            key = work / "sign.key"  # outside the context: never uploaded
            key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ))  # fmt: skip
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
            walls: dict[str, list[float]] = {m: [] for m in MODES}
            assemblies: dict[str, list[float]] = {m: [] for m in MODES}
            # one warm-up build: base image pulls and QEMU start-up count for no mode
            for n, mode in [(-1, "unsigned")] + [(n, m) for n in range(args.builds) for m in MODES]:
                began = time.perf_counter()
                done = await farm.cli(
                    "build", "--platform", PLATFORMS, "--progress", "quiet",
                    "-t", f"{registry.address}/bench/sign:r{n}-{mode}",
                    *(["--sign-key", str(key)] if mode == "signed" else []),
                    "--build-arg", f"BASE={base}",
                    "--build-arg", f"NONCE={secrets.token_hex(8)}", str(context),
                )  # fmt: skip
                if done.returncode != 0:
                    raise SystemExit(f"build failed: {done.stderr}")
                if n >= 0:
                    walls[mode].append(time.perf_counter() - began)
                    assemblies[mode].append(assembly[-1])
            print(
                f"{'signature':12} {'build median':>13} {'assembly median':>16}  (n={args.builds})"
            )
            for mode in MODES:
                print(f"{mode:12} {statistics.median(walls[mode]):12.2f}s "
                      f"{statistics.median(assemblies[mode]) * 1e3:14.1f}ms")  # fmt: skip
            if args.json:
                figures = {"platforms": PLATFORMS, "build_seconds": walls,
                           "assembly_seconds": assemblies}  # fmt: skip
                await asyncio.to_thread(Path(args.json).write_text, json.dumps(figures, indent=2))
            await farm.stop_agent("a")
            await coordinator.stop(grace=1)


if __name__ == "__main__":
    asyncio.run(main())

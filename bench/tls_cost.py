"""What TLS and tokens cost: submit latency and a real one-platform build, TLS vs --insecure.

Both coordinators run side by side in this process on 127.0.0.1, each with one real docker
agent; rounds alternate between them so drift hits both alike.

    .venv/bin/python bench/tls_cost.py --submits 300 --builds 5 \
        --platforms linux/amd64,linux/arm64,linux/arm/v7
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polyarch.agent.builders.docker import DockerBuilder
from polyarch.client.api import BuildClient
from polyarch.coordinator.server import Coordinator, CoordinatorConfig
from polyarch.proto.v1 import build_pb2, common_pb2
from tests.support import services
from tests.support.farm import Farm

DOCKERFILE = "ARG BASE=scratch\nFROM ${BASE}\nARG NONCE=0\nRUN echo $NONCE > /nonce\n"


async def start(work: Path, insecure: bool) -> Farm:
    config = CoordinatorConfig(
        listen="127.0.0.1:0", data_dir=work / "coordinator", metrics_listen="",
        insecure=insecure,
    )  # fmt: skip
    coordinator = Coordinator(config)
    await coordinator.start()
    farm = Farm(coordinator, work)
    await farm.add_agent(
        "a", DockerBuilder(services.docker_binary()), native=["linux/amd64"],
        emulated=["linux/arm64", "linux/arm/v7"], slots=3,
    )  # fmt: skip
    return farm


async def submit_latencies(farm: Farm, count: int) -> list[float]:
    """Sequential SubmitBuild calls of a queued-forever platform (nothing is built)."""
    context = b"bench"
    digest = "sha256:" + hashlib.sha256(context).hexdigest()
    seconds = []
    async with BuildClient(farm.address, credentials=farm.credentials()) as client:
        stub = client._stub()
        await stub.UploadContext(
            iter([common_pb2.ContextChunk(digest=digest, size=len(context), data=context)])
        )
        for _ in range(count):
            began = time.perf_counter()
            response = await client.submit(
                context_digest=digest, platforms=["linux/amd64"],
                tags=["127.0.0.1:9/bench/none:x"], idempotency_key=secrets.token_hex(8),
            )  # fmt: skip
            seconds.append(time.perf_counter() - began)
            await stub.CancelBuild(build_pb2.CancelBuildRequest(build_id=response.build.id))
    return seconds


async def build_seconds(farm: Farm, context: Path, tag: str, base: str, platforms: str) -> float:
    began = time.perf_counter()
    done = await farm.cli("build", "--platform", platforms, "-t", tag, "--progress", "quiet",
                          "--build-arg", f"BASE={base}", "--build-arg",
                          f"NONCE={secrets.token_hex(8)}", str(context))  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"build failed: {done.stderr}")
    return time.perf_counter() - began


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--builds", type=int, default=5)
    parser.add_argument("--platforms", default="linux/amd64",
                        help="the demo's: linux/amd64,linux/arm64,linux/arm/v7")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with services.running_registry(work / "registry") as registry:
            base = services.build_base_image(registry.address)
            context = work / "ctx"
            context.mkdir()
            (context / "Dockerfile").write_text(DOCKERFILE)
            farms = {
                "tls": await start(work / "tls", insecure=False),
                "insecure": await start(work / "insecure", insecure=True),
            }
            submits: dict[str, list[float]] = {name: [] for name in farms}
            builds: dict[str, list[float]] = {name: [] for name in farms}
            for _ in range(2):  # alternate halves
                for name, farm in farms.items():
                    submits[name] += await submit_latencies(farm, args.submits // 2)
            for n in range(args.builds):
                for name, farm in farms.items():
                    tag = f"{registry.address}/bench/tls-{name}:{n}"
                    seconds = await build_seconds(farm, context, tag, base, args.platforms)
                    builds[name].append(seconds)
            print(f"{'':10} {'submit p50':>11} {'submit p99':>11} {'build median':>13}")
            for name in farms:
                ordered = sorted(submits[name])
                p99 = ordered[int(len(ordered) * 0.99) - 1]
                print(f"{name:10} {statistics.median(ordered) * 1e3:9.2f}ms {p99 * 1e3:9.2f}ms "
                      f"{statistics.median(builds[name]):11.2f}s")  # fmt: skip
            ratio = statistics.median(submits["tls"]) / statistics.median(submits["insecure"])
            build_ratio = statistics.median(builds["tls"]) / statistics.median(builds["insecure"])
            print(f"tls / insecure: submit p50 {ratio:.2f}x, build median {build_ratio:.2f}x")
            for farm in farms.values():
                for agent in list(farm.agents):
                    await farm.stop_agent(agent)
                await farm.coordinator.stop(grace=1)


if __name__ == "__main__":
    asyncio.run(main())

"""Whole-tar contexts against incremental (manifest + missing blobs), side by side in one run.

A real farm on 127.0.0.1: a `polyarch coordinator` process (TLS, tokens), one
`polyarch agent --builder buildah` process and a registry. Each build is submitted through
the client library, exactly as `polyarch build` does, the old way (pack_context, upload
the whole tar) or the new way (build_manifest, send_context); the wall time runs from the
start of packing/hashing to the build's end. Bytes sent and fetched are the coordinator's
own counters (polyarch_context_bytes_received_total / _served_total).

Per round, both ways in alternating order, each on its own copy of the tree (so neither
warms the other's caches):

- tiny: a Dockerfile alone (after an untimed warm-up build of its own: whichever build goes
  first in a round pays ~0.35 s more, either way);
- first: 200 files of 1 MB, never seen before (fresh random bytes each round);
- same: the same 200 MB again;
- changed: the same 200 MB with one 1 MB file rewritten.

Then, once: the first upload of a 1 GB context (five 200 MB files) by a separate client
process (its peak RSS from wait4) with the coordinator's peak RSS (VmHWM); and 10,000
small files: the manifest (hash cache warm) plus the coordinator's lookup for a context
with one file changed.

    .venv/bin/python bench/incremental_context.py [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polyarch.client.api import BuildClient
from polyarch.client.context import pack_context
from polyarch.client.context_manifest import build_manifest
from polyarch.client.context_upload import send_context
from polyarch.client.file_hashes import FileHashes
from polyarch.proto.trust import Role
from polyarch.proto.v1 import common_pb2
from tests.support import services
from tests.support.farm import POLYARCH
from tests.support.poll import wait_until
from tests.support.secure_farm import SecureCoordinator, running_secure_coordinator

MB = 1_000_000
CASES = ["tiny", "first", "same", "changed"]
CLIENT_SCRIPT = """
import asyncio, json, sys, time
from pathlib import Path
from polyarch.client.api import BuildClient
from polyarch.client.context_manifest import build_manifest
from polyarch.client.context_upload import send_context
from polyarch.client.credentials import Credentials
from polyarch.client.file_hashes import FileHashes

async def main(address, token, context, cache):
    began = time.perf_counter()
    manifest = build_manifest(context, hashes=FileHashes(Path(cache)))
    hashed = time.perf_counter()
    async with BuildClient(address, credentials=Credentials(token=token)) as client:
        sent = await send_context(client, manifest)
    done = time.perf_counter()
    print(json.dumps({"hash_s": hashed - began, "upload_s": done - hashed,
                      "sent_bytes": sent.sent_bytes, "total_bytes": manifest.total_bytes}))

asyncio.run(main(*sys.argv[1:]))
"""


def counters(coordinator: SecureCoordinator) -> dict[str, float]:
    with urllib.request.urlopen(coordinator.metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for name in ("received", "served"):
        match = re.search(rf"^polyarch_context_bytes_{name}_total (\S+)$", text, re.M)
        found[name] = float(match[1]) if match else 0.0
    return found


def write_files(root: Path, count: int, size: int) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for n in range(count):
        (root / "data" / f"part-{n:04}").write_bytes(os.urandom(size))


async def timed_build(
    coordinator: SecureCoordinator, context: Path, way: str, base: str, tag: str, cache: Path
) -> dict[str, float]:
    """One build of `context` sent `way` ("tar" or "incremental"): seconds and bytes."""
    before = counters(coordinator)
    began = time.perf_counter()
    async with BuildClient(coordinator.address, credentials=coordinator.credentials()) as client:
        if way == "tar":
            packed = await asyncio.to_thread(pack_context, context)
            try:
                await client.upload_context(packed)
            finally:
                packed.discard()
            digest, dockerfile = packed.digest, packed.dockerfile
        else:
            manifest = await asyncio.to_thread(build_manifest, context, hashes=FileHashes(cache))
            sent = await send_context(client, manifest)
            digest, dockerfile = sent.digest, sent.dockerfile
        submitted = await client.submit(
            context_digest=digest, dockerfile=dockerfile, platforms=["linux/amd64"],
            tags=[tag], build_args={"BASE": base},
        )  # fmt: skip
        build = await client.follow(submitted.build.id, lambda _event: None)
    seconds = time.perf_counter() - began
    if build.state != common_pb2.BUILD_STATE_SUCCEEDED:
        raise SystemExit(f"{way} build of {context} failed: {build.error}")
    after = counters(coordinator)
    return {
        "s": seconds,
        "sent": after["received"] - before["received"],
        "fetched": after["served"] - before["served"],
    }


async def one_round(
    coordinator: SecureCoordinator, work: Path, n: int, base: str, registry: str
) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {case: {} for case in CASES}
    ways = ["tar", "incremental"] if n % 2 == 0 else ["incremental", "tar"]
    roots = {way: work / f"round-{n}-{way}" for way in ways}
    for root in roots.values():  # both trees first, flushed: no way times the other's writes
        for context in (root / "tiny", root / "big"):
            context.mkdir(parents=True)
            (context / "Dockerfile").write_text("ARG BASE\nFROM ${BASE}\nRUN true\n")
        write_files(root / "big", 200, MB)
    os.sync()
    # untimed: the first build of a round pays ~0.35 s more whichever way goes first
    warm = work / f"round-{n}-warm-up"
    warm.mkdir()
    (warm / "Dockerfile").write_text("ARG BASE\nFROM ${BASE}\nRUN true\n")
    await timed_build(coordinator, warm, "incremental", base, f"{registry}/bench/warm:{n}", warm)
    shutil.rmtree(warm)
    for way in ways:
        root = roots[way]
        tiny, big = root / "tiny", root / "big"
        tag = f"{registry}/bench/incremental-{way}:{n}"
        cache = root / "hash-cache"
        results["tiny"][way] = await timed_build(coordinator, tiny, way, base, tag, cache)
        results["first"][way] = await timed_build(coordinator, big, way, base, tag, cache)
        results["same"][way] = await timed_build(coordinator, big, way, base, tag, cache)
        (big / "data" / "part-0100").write_bytes(os.urandom(MB))
        results["changed"][way] = await timed_build(coordinator, big, way, base, tag, cache)
    for root in roots.values():
        shutil.rmtree(root)
    return results


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(match[1]) if match else 0


def gigabyte_upload(coordinator: SecureCoordinator, work: Path) -> dict[str, float]:
    """A separate client process sends a fresh 1 GB context; its and the coordinator's RSS."""
    context = work / "gigabyte"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\n")
    for n in range(5):
        with (context / f"blob-{n}").open("wb") as out:
            for _ in range(200):
                out.write(os.urandom(MB))
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, coordinator.address, coordinator.admin_token,
         str(context), str(work / "gigabyte-cache")],
        stdout=subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit("the 1 GB client failed")
    figures = json.loads(out)
    shutil.rmtree(context)
    return {
        **figures,
        "upload_mb_per_s": figures["sent_bytes"] / MB / figures["upload_s"],
        "hash_and_upload_mb_per_s": figures["total_bytes"]
        / MB
        / (figures["hash_s"] + figures["upload_s"]),
        "client_peak_rss_mib": usage.ru_maxrss / 1024,
        "coordinator_peak_rss_mib": peak_rss_kib(coordinator.proc.pid) / 1024,
    }


async def small_files(coordinator: SecureCoordinator, work: Path) -> dict[str, float]:
    """10,000 small files: first send, then manifest + lookup with one file changed."""
    context = work / "small"
    (context / "src").mkdir(parents=True)
    (context / "Dockerfile").write_text("FROM scratch\n")
    for n in range(10_000):
        (context / "src" / f"f{n:05}.txt").write_text(f"file {n}\n")
    cache = work / "small-cache"
    async with BuildClient(coordinator.address, credentials=coordinator.credentials()) as client:
        began = time.perf_counter()
        first = build_manifest(context, hashes=FileHashes(cache))
        await send_context(client, first)
        first_s = time.perf_counter() - began
        (context / "src" / "f00042.txt").write_text("changed\n")
        began = time.perf_counter()
        manifest = build_manifest(context, hashes=FileHashes(cache))
        built = time.perf_counter()
        sent = await send_context(client, manifest)
        done = time.perf_counter()
    shutil.rmtree(context)
    return {
        "first_send_s": first_s,
        "manifest_s": built - began,
        "lookup_and_send_s": done - built,
        "total_s": done - began,
        "sent_blobs": sent.sent_blobs,
    }


def start_agent(coordinator: SecureCoordinator, work: Path, token: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, POLYARCH_TOKEN=token)
    log = (work / "agent.log").open("wb")
    proc = subprocess.Popen(
        [POLYARCH, "agent", "--coordinator", coordinator.address, "--name", "bench",
         "--builder", "buildah", "--native", "linux/amd64", "--emulated", "none",
         "--slots", "1", "--work-dir", str(work / "agent")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    log.close()
    wait_until(
        lambda: '"bench"' in coordinator.cli("agents", "--json").stdout,
        timeout=60,
        message="agent connected",
    )
    return proc


def median(rounds: list[dict[str, Any]], case: str, way: str, key: str) -> float:
    return statistics.median(r[case][way][key] for r in rounds)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="polyarch-context-bench-") as tmp:
        work = Path(tmp)
        with services.running_registry(work / "registry") as registry:
            base = services.build_base_image(registry.address)
            with running_secure_coordinator(work) as coordinator:
                agent = start_agent(coordinator, work, await coordinator.token(Role.AGENT))
                try:
                    rounds = []
                    for n in range(args.rounds):
                        rounds.append(await one_round(coordinator, work, n, base, registry.address))
                        print(f"round {n + 1}/{args.rounds} done", file=sys.stderr)
                    gigabyte = gigabyte_upload(coordinator, work)
                    small = await small_files(coordinator, work)
                finally:
                    services.stop_process(agent)
    print(f"buildah agent, linux/amd64, {args.rounds} rounds; medians")
    print(f"{'context':<10} {'tar s':>7} {'incr s':>7} {'incr/tar':>8} {'tar sent MB':>11} "
          f"{'incr sent MB':>12} {'tar fetched MB':>14} {'incr fetched MB':>15}")  # fmt: skip
    summary: dict[str, Any] = {}
    for case in CASES:
        row = {f"{way}_{key}": median(rounds, case, way, key)
               for way in ("tar", "incremental") for key in ("s", "sent", "fetched")}  # fmt: skip
        summary[case] = row
        print(f"{case:<10} {row['tar_s']:7.2f} {row['incremental_s']:7.2f} "
              f"{row['incremental_s'] / row['tar_s']:8.2f} {row['tar_sent'] / MB:11.1f} "
              f"{row['incremental_sent'] / MB:12.2f} {row['tar_fetched'] / MB:14.1f} "
              f"{row['incremental_fetched'] / MB:15.2f}")  # fmt: skip
    tiny = summary["tiny"]["incremental_s"]
    for case in ("same", "changed"):
        print(
            f"incremental {case} - incremental tiny: {summary[case]['incremental_s'] - tiny:+.2f} s"
        )
    print(f"1 GB first upload: {gigabyte['upload_mb_per_s']:.0f} MB/s upload, "
          f"{gigabyte['hash_and_upload_mb_per_s']:.0f} MB/s hash+upload; peak RSS client "
          f"{gigabyte['client_peak_rss_mib']:.0f} MiB, coordinator "
          f"{gigabyte['coordinator_peak_rss_mib']:.0f} MiB")  # fmt: skip
    print(f"10,000 small files: first send {small['first_send_s']:.2f} s; one changed: manifest "
          f"{small['manifest_s']:.2f} s + lookup and send {small['lookup_and_send_s']:.2f} s "
          f"= {small['total_s']:.2f} s ({small['sent_blobs']} blob sent)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(
            {"rounds": rounds, "median": summary, "gigabyte": gigabyte, "small_files": small},
            indent=2,
        ) + "\n")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())

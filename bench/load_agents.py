"""A fleet of fake agents for bench/load.py: the real agent protocol, no builds.

Each agent opens its own channel and AgentService.Connect stream, says hello (native
platforms, no emulation, builder "fake"), heartbeats at the interval the Welcome names, and
answers each Assignment with JobStarted and, `--job-seconds` later, a successful JobResult.
CancelJob drops the pending result.

Protocol with the harness: when every agent has its Welcome the process writes
{"pid", "agents"} to --ready-file. On SIGTERM or SIGINT it closes the streams and writes
--out: every Assignment's arrival (CLOCK_MONOTONIC, which is system-wide on Linux, so the
harness can compare it with its own send times) and, per agent, how many jobs it got and how
many times the coordinator ended its stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc

IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# When the Welcome names no interval: the agent runtime's own default.
DEFAULT_HEARTBEAT_SECONDS = 3.0
RECONNECT_SECONDS = 0.5
PR_SET_PDEATHSIG = 1


class FakeAgent:
    """One agent: a Connect stream that takes assignments and reports them done."""

    def __init__(
        self, name: str, address: str, slots: int, platforms: list[str], job_seconds: float
    ) -> None:
        self.name = name
        self.address = address
        self.slots = slots
        self.platforms = platforms
        self.job_seconds = job_seconds
        self.welcomed = asyncio.Event()
        self.assignments: list[tuple[str, str, float]] = []  # build id, platform, arrival
        self.cancels = 0
        self.ended_by_coordinator: list[str] = []
        self._stopping = False
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        self._pending: dict[tuple[str, int], asyncio.TimerHandle] = {}

    async def run(self) -> None:
        """Connects, and reconnects after any end the harness did not ask for."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            while not self._stopping:
                reason = await self._session(stub)
                if self._stopping:
                    return
                self.ended_by_coordinator.append(reason)
                await asyncio.sleep(RECONNECT_SECONDS)

    def stop(self) -> None:
        """Marks the end as ours; the harness then cancels the task running `run`."""
        self._stopping = True

    async def _requests(self) -> AsyncIterator[agent_pb2.AgentMessage]:
        while (message := await self._outbox.get()) is not None:
            yield message

    async def _session(self, stub: agent_pb2_grpc.AgentServiceStub) -> str:
        self._outbox = asyncio.Queue()
        self._outbox.put_nowait(
            agent_pb2.AgentMessage(
                hello=agent_pb2.AgentHello(
                    name=self.name, version="load-bench", builder="fake",
                    native_platforms=self.platforms, slots=self.slots,
                    running=self._running(),
                )
            )
        )  # fmt: skip
        heartbeat: asyncio.Task[None] | None = None
        call = stub.Connect(self._requests())
        try:
            async for message in call:
                kind = message.WhichOneof("message")
                if kind == "welcome":
                    interval_ms = message.welcome.heartbeat_interval_ms
                    interval = interval_ms / 1000 if interval_ms > 0 else DEFAULT_HEARTBEAT_SECONDS
                    heartbeat = asyncio.create_task(self._heartbeat(interval))
                    self.welcomed.set()
                elif kind == "assign":
                    self._take(message.assign)
                elif kind == "cancel":
                    handle = self._pending.pop(
                        (message.cancel.job_id, message.cancel.attempt), None
                    )
                    if handle is not None:
                        handle.cancel()
                        self.cancels += 1
            return "stream ended by the coordinator"
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            call.cancel()

    def _running(self) -> list[agent_pb2.RunningJob]:
        return [agent_pb2.RunningJob(job_id=j, attempt=a) for j, a in self._pending]

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            beat = agent_pb2.Heartbeat(running=self._running())
            self._outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=beat))

    def _take(self, assign: agent_pb2.Assignment) -> None:
        self.assignments.append((assign.build_id, assign.platform, time.monotonic()))
        key = (assign.job_id, assign.attempt)
        started = agent_pb2.JobStarted(job_id=assign.job_id, attempt=assign.attempt)
        self._outbox.put_nowait(agent_pb2.AgentMessage(started=started))
        if self.job_seconds <= 0:
            self._finish(key)
        else:
            loop = asyncio.get_running_loop()
            self._pending[key] = loop.call_later(self.job_seconds, self._finish, key)

    def _finish(self, key: tuple[str, int]) -> None:
        self._pending.pop(key, None)
        result = agent_pb2.JobResult(
            job_id=key[0], attempt=key[1], ok=True, digest="sha256:" + secrets.token_hex(32),
            size=1234, media_type=IMAGE_MANIFEST,
        )  # fmt: skip
        self._outbox.put_nowait(agent_pb2.AgentMessage(result=result))


def platforms_of(index: int, fleet: str) -> list[str]:
    """ "both": every agent builds amd64 and arm64 natively; "split": even agents amd64, odd
    agents arm64."""
    if fleet == "both":
        return ["linux/amd64", "linux/arm64"]
    return ["linux/amd64"] if index % 2 == 0 else ["linux/arm64"]


def die_with_parent() -> None:
    """SIGTERM when the harness dies, even by SIGKILL: no fleet outlives its run."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def run(args: argparse.Namespace) -> int:
    die_with_parent()
    agents = [
        FakeAgent(
            f"load-{i:05d}",
            args.address,
            args.slots,
            platforms_of(i, args.fleet),
            args.job_seconds,
        )
        for i in range(args.first, args.first + args.count)
    ]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(agent.run(), name=agent.name) for agent in agents]
    welcomed = asyncio.gather(*(agent.welcomed.wait() for agent in agents))
    await asyncio.wait(
        [asyncio.ensure_future(welcomed), asyncio.ensure_future(stop.wait())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    if welcomed.done():
        partial = args.ready_file.with_suffix(".partial")
        partial.write_text(json.dumps({"pid": os.getpid(), "agents": len(agents)}))
        os.replace(partial, args.ready_file)
    await stop.wait()
    for agent in agents:
        agent.stop()
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=5.0)
    report: dict[str, Any] = {
        "agents": {
            a.name: {
                "platforms": a.platforms,
                "jobs": len(a.assignments),
                "cancels": a.cancels,
                "ended_by_coordinator": a.ended_by_coordinator,
            }
            for a in agents
        },
        "assignments": [(a.name, *item) for a in agents for item in a.assignments],
    }
    partial = args.out.with_suffix(".partial")
    partial.write_text(json.dumps(report))
    os.replace(partial, args.out)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first agent")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--fleet", choices=["both", "split"], default="both")
    parser.add_argument("--job-seconds", type=float, default=0.0)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

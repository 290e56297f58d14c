"""The agent's handling of assignments: a newer attempt of a job always starts."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from polyarch.agent.builders.base import BuildRequest, PushedImage
from polyarch.agent.runtime import Agent, AgentConfig
from polyarch.proto.platforms import parse_platform
from polyarch.proto.v1 import agent_pb2, common_pb2
from tests.support.poll import poll_until


def tiny_context() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"FROM scratch\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Stub:
    def __init__(self, context: bytes) -> None:
        self.context = context

    def FetchContext(
        self, request: agent_pb2.FetchContextRequest
    ) -> AsyncIterator[common_pb2.ContextChunk]:
        async def chunks() -> AsyncIterator[common_pb2.ContextChunk]:
            yield common_pb2.ContextChunk(data=self.context)

        return chunks()


class HeldBuilder:
    """Holds every build until released; records the attempts it was asked to build."""

    name = "held"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[str] = []

    async def idle(self) -> None:
        pass  # nothing runs in the background

    def may_link_context(self, dockerfile: bytes | None) -> bool:
        return False  # builds nothing from the folder; copies are the safe default

    async def check(self) -> None:
        pass

    async def build_and_push(
        self, request: BuildRequest, on_line: Callable[[str], None]
    ) -> PushedImage:
        self.started.append(request.image)
        await self.release.wait()
        return PushedImage("sha256:" + "1" * 64, 10, "application/vnd.oci.image.manifest.v1+json")


def assignment(attempt: int, digest: str) -> agent_pb2.CoordinatorMessage:
    return agent_pb2.CoordinatorMessage(
        assign=agent_pb2.Assignment(
            job_id="b1-linux-amd64", attempt=attempt, build_id="b1", platform="linux/amd64",
            context_digest=digest, repository="127.0.0.1:5000/a/b",
            push_tag=f"polyarch-b1-linux-amd64-{attempt}",
        )
    )  # fmt: skip


async def test_a_newer_attempt_replaces_one_still_winding_down(tmp_path: Path) -> None:
    context = tiny_context()
    digest = "sha256:" + hashlib.sha256(context).hexdigest()
    builder = HeldBuilder()
    config = AgentConfig(coordinator="unused:1", name="a", native=[parse_platform("linux/amd64")],
                         emulated=[], work_dir=tmp_path / "agent")  # fmt: skip
    agent = Agent(config, builder)
    stub = Stub(context)
    agent._handle(stub, assignment(1, digest))  # type: ignore[arg-type]
    await poll_until(lambda: len(builder.started) == 1, timeout=5, message="attempt 1 builds")
    first = agent.jobs["b1-linux-amd64"][1]
    agent._handle(stub, assignment(1, digest))  # type: ignore[arg-type]  # a duplicate: ignored
    assert agent.jobs["b1-linux-amd64"][1] is first
    agent._handle(stub, assignment(2, digest))  # type: ignore[arg-type]
    await poll_until(lambda: len(builder.started) == 2, timeout=5, message="attempt 2 builds")
    assert first.cancelled() or first.done()
    assert agent.jobs["b1-linux-amd64"][0] == 2
    builder.release.set()
    await poll_until(lambda: not agent.jobs, timeout=5, message="attempt 2 finished")
    results = []
    while not agent.outbox.empty():
        message = agent.outbox.get_nowait()
        if message.WhichOneof("message") == "result":
            results.append((message.result.attempt, message.result.ok))
    assert (2, True) in results


def test_the_agent_heartbeats_at_the_pace_the_coordinator_sets(tmp_path: Path) -> None:
    config = AgentConfig(
        coordinator="unused:1", name="a", native=[parse_platform("linux/amd64")],
        emulated=[], work_dir=tmp_path / "agent", heartbeat_interval=3.0,
    )  # fmt: skip
    agent = Agent(config, HeldBuilder())
    welcome = agent_pb2.CoordinatorMessage(welcome=agent_pb2.Welcome(heartbeat_interval_ms=1500))
    agent._handle(Stub(b""), welcome)  # type: ignore[arg-type]
    assert agent.heartbeat_interval == 1.5 and agent.connected.is_set()

"""Probes of the request caps against a real TLS coordinator: tags, pages, log floods.

Each probe asserts the exact gRPC status, and that the coordinator is still healthy after.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from polyarch.proto.trust import Role
from polyarch.proto.v1 import agent_pb2, build_pb2, build_pb2_grpc, common_pb2
from tests.support.poll import poll_until
from tests.support.secure_farm import (
    SecureCoordinator,
    agent_stream,
    builds_json,
    healthy,
    running_secure_coordinator,
)

pytestmark = pytest.mark.security

MIB = 1 << 20
LIMITS = {"max_tags": "8", "max_list_page": "10", "max_log_bytes_per_job": "2MiB",
          "max_watcher_backlog_bytes": "2MiB"}  # fmt: skip
# What a flood may add to the coordinator's memory. Under the limits above it keeps 2 MiB of
# log for the job and at most 2 MiB queued per watcher; gRPC holds at most a flow-control
# window per stream and one 4 MiB message (max_request_bytes) being decoded at a time.
# The rest is allocator slack. Before these caps the same flood added about 175 MiB.
RSS_GROWTH_BOUND = 64 * MIB


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCoordinator]:
    args = [a for name, value in LIMITS.items() for a in ("--limit", f"{name}={value}")]
    with running_secure_coordinator(tmp_path_factory.mktemp("caps"), *args) as running:
        yield running


@pytest.fixture
async def after_each_probe(coordinator: SecureCoordinator) -> AsyncIterator[None]:
    yield
    assert await asyncio.to_thread(healthy, coordinator), coordinator.log()[-3000:]


async def upload(stub: build_pb2_grpc.BuildServiceStub, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    chunk = common_pb2.ContextChunk(digest=digest, size=len(data), data=data)
    await stub.UploadContext(iter([chunk]))
    return digest


def rss(coordinator: SecureCoordinator) -> int:
    """The coordinator process's resident memory in bytes (/proc/PID/status VmRSS)."""
    status = Path(f"/proc/{coordinator.proc.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


async def test_forty_thousand_tags_are_refused_and_listing_still_works(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    ci = await coordinator.token(Role.CI)
    async with coordinator.channel(ci) as channel:
        stub = build_pb2_grpc.BuildServiceStub(channel)
        digest = await upload(stub, b"forty thousand tags")
        request = build_pb2.SubmitBuildRequest(
            context_digest=digest, platforms=["linux/amd64"],
            tags=[f"127.0.0.1:9/p/q:t{i}" for i in range(40_000)],
        )  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitBuild(request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == "40000 tags in one build; the limit is 8 (max_tags)"
    for token in (None, await coordinator.token(Role.READ)):  # everyone can still list
        done = coordinator.cli("builds", "--json", token=token)
        assert done.returncode == 0, done.stderr
    assert all(len(b["tags"]) <= 8 for b in builds_json(coordinator))


async def test_pages_of_ten_hold_each_of_25_queued_builds_exactly_once(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    identity = await coordinator.enrol("s390x-pages")
    ci = await coordinator.token(Role.CI)
    async with agent_stream(coordinator, identity, native_platforms=["linux/s390x"]) as (_, call):
        await call.read()  # welcome: the agent is attached, s390x builds are schedulable
        async with coordinator.channel(ci) as channel:
            stub = build_pb2_grpc.BuildServiceStub(channel)
            digest = await upload(stub, b"pages")
            submitted = set()
            for i in range(25):
                response = await stub.SubmitBuild(build_pb2.SubmitBuildRequest(
                    context_digest=digest, platforms=["linux/s390x"],
                    tags=[f"127.0.0.1:9/pages/app:{i}"]))  # fmt: skip
                submitted.add(response.build.id)
            seen: list[str] = []
            sizes: list[int] = []
            token = ""
            while True:
                page = await stub.ListBuilds(
                    build_pb2.ListBuildsRequest(page_size=10, page_token=token)
                )
                sizes.append(len(page.builds))
                seen += [b.id for b in page.builds]
                if not (token := page.next_page_token):
                    break
            capped = await stub.ListBuilds(build_pb2.ListBuildsRequest(page_size=1000))
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.ListBuilds(build_pb2.ListBuildsRequest(page_token="not-a-token"))
    assert len(seen) == len(set(seen)), "a build was listed twice"
    assert submitted <= set(seen) and seen[:25] == [s for s in seen if s in submitted]
    assert all(size == 10 for size in sizes[:-1])
    assert len(capped.builds) == 10  # max_list_page
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed page_token" in (bad.value.details() or "")
    # the CLI's --limit follows pages past the coordinator's page cap
    listed = coordinator.cli("builds", "--limit", "25", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {b["id"] for b in json.loads(listed.stdout)} == submitted


async def test_a_log_flood_and_a_watcher_that_never_reads_stay_bounded(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    identity = await coordinator.enrol("ppc-flood")
    ci = await coordinator.token(Role.CI)
    async with agent_stream(coordinator, identity, native_platforms=["linux/ppc64le"]) as (
        outbox, call,
    ), coordinator.channel(ci) as channel:  # fmt: skip
        await call.read()  # welcome
        stub = build_pb2_grpc.BuildServiceStub(channel)
        digest = await upload(stub, b"flood")
        build = (await stub.SubmitBuild(build_pb2.SubmitBuildRequest(
            context_digest=digest, platforms=["linux/ppc64le"],
            tags=["127.0.0.1:9/flood/app:1"]))).build  # fmt: skip
        assign = (await asyncio.wait_for(call.read(), 10)).assign
        assert assign.build_id == build.id
        job = {"job_id": assign.job_id, "attempt": assign.attempt}
        await outbox.put(agent_pb2.AgentMessage(started=agent_pb2.JobStarted(**job)))

        slow = stub.WatchBuild(build_pb2.WatchBuildRequest(build_id=build.id))
        assert (await slow.read()).build.id == build.id  # subscribed; never read again
        lines: list[str] = []
        reader = asyncio.create_task(read_logs(stub, build.id, lines))
        await poll_until(lambda: len(lines) > 0 or reader.done(), timeout=10,
                         message="the reading watcher has its snapshot")  # fmt: skip
        before = rss(coordinator)
        # 200 one-MiB lines (three per message, under the 4 MiB request limit), then 400 of
        # 20 KiB; after each message the reading watcher is waited for, the slow one not
        batches = [[f"{b}-{i} " + "x" * MIB for i in range(3)] for b in range(67)]
        batches += [[f"s{b}-{i} " + "y" * 20_000 for i in range(20)] for b in range(20)]
        for batch in batches:
            await outbox.put(agent_pb2.AgentMessage(log=agent_pb2.JobLog(**job, lines=batch)))
            tag = batch[-1].split(" ", 1)[0] + " "
            await poll_until(caught_up(reader, lines, tag), timeout=30,
                             message=f"the reading watcher got {tag!r}")  # fmt: skip
        grown = rss(coordinator) - before
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            while await asyncio.wait_for(slow.read(), 30) is not grpc.aio.EOF:
                pass
        assert not reader.done(), reader  # the watcher that reads was never cut off
        reader.cancel()
    assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = cut.value.details() or ""
    assert "the limit is 2097152 bytes (max_watcher_backlog_bytes)" in details, details
    assert grown < RSS_GROWTH_BOUND, f"the coordinator grew by {grown / MIB:.1f} MiB"
    assert all(len(x.encode()) < 17 * 1024 for x in lines), "a line was not truncated"
    assert any("[polyarch: line truncated, " in x for x in lines)


async def read_logs(stub: build_pb2_grpc.BuildServiceStub, build_id: str, into: list[str]) -> None:
    """A watcher that keeps up: records every log line it gets (a marker for the snapshot)."""
    async for event in stub.WatchBuild(build_pb2.WatchBuildRequest(build_id=build_id)):
        into.append(event.log.line if event.HasField("log") else "(snapshot)")


def caught_up(reader: asyncio.Task[None], lines: list[str], tag: str) -> Callable[[], bool]:
    return lambda: reader.done() or any(x.startswith(tag) for x in lines[-20:])

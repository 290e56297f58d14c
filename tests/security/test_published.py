"""What gets published is what was built: an enrolled agent that lies about its result.

A fake agent (a real enrolled identity speaking the agent protocol by hand) takes a job and
reports (a) a malformed digest, (b) the digest of an older image already in the repository,
without pushing its per-job tag, (c) its per-job tag pushed, but another image's digest
reported. None may publish a tag, and the coordinator must stay healthy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from polyarch.proto.media_types import OCI_MANIFEST
from polyarch.proto.trust import Role
from polyarch.proto.v1 import agent_pb2, build_pb2, build_pb2_grpc, common_pb2
from tests.support.secure_farm import (
    SecureCoordinator,
    agent_stream,
    healthy,
    running_secure_coordinator,
)
from tests.support.services import Registry
from tests.support.verify import skopeo_missing

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCoordinator]:
    with running_secure_coordinator(tmp_path_factory.mktemp("published")) as running:
        yield running


def copy_image(source: str, target: str, arch: str = "amd64") -> tuple[str, int, str]:
    """skopeo copy of one platform (linux/ARCH); returns the target's (digest, size, type)."""
    subprocess.run(
        ["skopeo", "copy", "--override-arch", arch, "--src-tls-verify=false",
         "--dest-tls-verify=false", f"docker://{source}", f"docker://{target}"],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{target}"],
        capture_output=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    return "sha256:" + hashlib.sha256(raw).hexdigest(), len(raw), json.loads(raw)["mediaType"]


async def submit(coordinator: SecureCoordinator, repo: str, nonce: str) -> str:
    context = f"context {nonce}".encode()
    digest = "sha256:" + hashlib.sha256(context).hexdigest()
    async with coordinator.channel(await coordinator.token(Role.CI)) as channel:
        stub = build_pb2_grpc.BuildServiceStub(channel)
        await stub.UploadContext(
            iter([common_pb2.ContextChunk(digest=digest, size=len(context), data=context)])
        )
        response = await stub.SubmitBuild(
            build_pb2.SubmitBuildRequest(
                context_digest=digest, platforms=["linux/amd64"], tags=[f"{repo}:v1"]
            )
        )
    return response.build.id


async def lie(call: Any, outbox: asyncio.Queue[Any], report: Any) -> int:
    """Answers every assignment with report(assignment) until the stream ends; counts them."""
    answered = 0
    while True:
        try:
            message = await asyncio.wait_for(call.read(), 30)
        except TimeoutError:
            return answered
        if message is grpc.aio.EOF:
            return answered
        if message.WhichOneof("message") != "assign":
            continue
        job = message.assign
        started = agent_pb2.JobStarted(job_id=job.job_id, attempt=job.attempt)
        await outbox.put(agent_pb2.AgentMessage(started=started))
        fields = await asyncio.to_thread(report, job)
        result = agent_pb2.JobResult(job_id=job.job_id, attempt=job.attempt, ok=True, **fields)
        await outbox.put(agent_pb2.AgentMessage(result=result))
        answered += 1


async def final_build(coordinator: SecureCoordinator, build_id: str) -> dict[str, Any]:
    for _ in range(300):
        done = await asyncio.to_thread(coordinator.cli, "builds", "--json")
        builds = {b["id"]: b for b in json.loads(done.stdout)}
        if builds[build_id]["state"] in ("succeeded", "failed", "cancelled"):
            return builds[build_id]
        await asyncio.sleep(0.1)
    raise AssertionError(f"build {build_id} never ended")


@pytest.mark.parametrize("lie_kind", ["malformed", "foreign", "mismatched"])
async def test_a_lying_agent_publishes_nothing(
    coordinator: SecureCoordinator, registry: Registry, base_image: str, unique_repo: str,
    lie_kind: str,
) -> None:  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    # an older release is already in the repository: what a forged result would point at
    old = await asyncio.to_thread(copy_image, base_image, f"{repo}:prod")
    other = await asyncio.to_thread(copy_image, base_image, f"{repo}:other")

    def report(job: agent_pb2.Assignment) -> dict[str, Any]:
        if lie_kind == "malformed":
            return {"digest": "sha256:" + "z" * 64, "size": 100, "media_type": OCI_MANIFEST}
        if lie_kind == "mismatched":  # pushes its own tag, with some image, reports another
            copy_image(base_image, f"{job.repository}:{job.push_tag}", arch="arm64")
        digest, size, media_type = other if lie_kind == "mismatched" else old
        return {"digest": digest, "size": size, "media_type": media_type}

    identity = await coordinator.enrol(f"liar-{lie_kind}")
    async with agent_stream(coordinator, identity, native_platforms=["linux/amd64"]) as (
        outbox, call,
    ):  # fmt: skip
        assert (await call.read()).WhichOneof("message") == "welcome"
        build_id = await submit(coordinator, repo, lie_kind + unique_repo)
        liar = asyncio.create_task(lie(call, outbox, report))
        build = await final_build(coordinator, build_id)
        liar.cancel()
    assert build["state"] == "failed", build
    job = build["jobs"][0]
    if lie_kind == "malformed":
        assert "reported a malformed digest" in job["error"], job
        assert job["attempt"] == 3  # retried elsewhere (here: nowhere else), then failed
    elif lie_kind == "foreign":
        assert "per-job tag" in build["error"] and "cannot be read" in build["error"], build
    else:
        assert f"reported {other[0]} but its per-job tag" in build["error"], build
    assert await asyncio.to_thread(skopeo_missing, f"{repo}:v1"), "a tag was published"
    assert await asyncio.to_thread(healthy, coordinator)

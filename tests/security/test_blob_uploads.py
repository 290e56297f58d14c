"""Probes of incremental (manifest) contexts against a real TLS coordinator: the whole flow,
resumes, refusals of forged or unlisted blobs and of manifests over the limits, and that
only the agent assigned a context reads its blobs.

Each probe asserts the exact gRPC status, and that the coordinator is still healthy after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from polyarch.agent.enrolment import Identity
from polyarch.proto.context_manifest import ContextManifest, ManifestEntry
from polyarch.proto.trust import Role, aio_channel
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc, build_pb2, build_pb2_grpc, common_pb2
from tests.support.poll import poll_until
from tests.support.secure_farm import (
    SecureCoordinator,
    agent_stream,
    healthy,
    running_secure_coordinator,
)

pytestmark = pytest.mark.security

MIB = 1 << 20
PER_CALLER = 2
LIMIT_ARGS = (
    "--limit", "max_manifest_bytes=8KiB", "--limit", "max_context_entries=20",
    "--limit", "max_context_bytes=16MiB", "--limit", "upload_idle_seconds=3",
    "--limit", f"max_concurrent_uploads_per_caller={PER_CALLER}",
)  # fmt: skip
BIG = os.urandom(3 * MIB + 11)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_of(files: dict[str, bytes]) -> ContextManifest:
    entries = [ManifestEntry("src", "dir", 0o755, 1)]
    entries += [ManifestEntry(p, "file", 0o644, 1, len(d), sha(d)) for p, d in files.items()]
    return ContextManifest.from_entries(entries)


def blob_messages(
    context: str, data: bytes, offset: int = 0, digest: str = ""
) -> list[build_pb2.UploadBlobsChunk]:
    """One blob of an UploadBlobs stream in 1 MiB chunks, the first naming the context."""
    out = []
    for start in range(offset, max(len(data), offset + 1), MIB):
        header = start == offset
        blob = common_pb2.BlobChunk(
            digest=(digest or sha(data)) if header else "", size=len(data) if header else 0,
            offset=offset if header else 0, data=data[start : start + MIB],
        )  # fmt: skip
        out.append(build_pb2.UploadBlobsChunk(blob=blob))
    out[0].context_digest = context
    return out


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCoordinator]:
    work = tmp_path_factory.mktemp("blobs")
    with running_secure_coordinator(work, *LIMIT_ARGS) as running:
        yield running


@pytest.fixture
async def after_each_probe(coordinator: SecureCoordinator) -> AsyncIterator[None]:
    yield
    assert await asyncio.to_thread(healthy, coordinator), coordinator.log()[-3000:]
    tmp = coordinator.data_dir / "contexts" / "tmp"
    await poll_until(lambda: os.listdir(tmp) == [], timeout=10, message="no temp file left")


@contextlib.asynccontextmanager
async def build_api(
    coordinator: SecureCoordinator,
) -> AsyncIterator[build_pb2_grpc.BuildServiceStub]:
    async with coordinator.channel(await coordinator.token(Role.CI)) as channel:
        yield build_pb2_grpc.BuildServiceStub(channel)


async def upload_manifest(
    stub: build_pb2_grpc.BuildServiceStub, manifest: ContextManifest
) -> build_pb2.UploadContextResponse:
    data = manifest.encode()
    first = common_pb2.ContextChunk(
        digest=manifest.digest, size=len(data), data=data, kind=common_pb2.CONTEXT_KIND_MANIFEST
    )
    response: build_pb2.UploadContextResponse = await stub.UploadContext(iter([first]))
    return response


async def missing(stub: build_pb2_grpc.BuildServiceStub, digest: str) -> list[tuple[str, int, int]]:
    request = build_pb2.MissingBlobsRequest(context_digest=digest)
    return [(r.digest, r.size, r.offset) async for r in stub.MissingBlobs(request)]


def upload_blobs_sync(
    coordinator: SecureCoordinator, token: str, messages: list[build_pb2.UploadBlobsChunk]
) -> tuple[grpc.StatusCode, str]:
    """UploadBlobs through grpc's sync API: a refusal while the client still writes is
    reported as the server's status there (grpc/grpc#36066, see test_uploads.py)."""
    trust = coordinator.trust(token)
    credentials = trust.credentials()
    assert credentials is not None
    with grpc.secure_channel(coordinator.address, credentials, trust.channel_options()) as channel:
        try:
            build_pb2_grpc.BuildServiceStub(channel).UploadBlobs(iter(messages), timeout=60)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_a_manifest_context_goes_up_in_parts_and_only_its_agent_reads_it(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    files = {"Dockerfile": b"FROM scratch\n", "src/a.py": b"print(1)\n", "src/big": BIG,
             "src/copy.py": b"print(1)\n", "src/empty": b""}  # fmt: skip
    manifest = manifest_of(files)
    digest = manifest.digest
    async with build_api(coordinator) as stub:
        stat = await stub.StatContext(build_pb2.StatContextRequest(digest=digest))
        assert not stat.present
        answer = await upload_manifest(stub, manifest)
        assert (answer.missing_blobs, answer.missing_bytes) == (4, len(BIG) + 22)
        assert not (await stub.StatContext(build_pb2.StatContextRequest(digest=digest))).present
        ranges = await missing(stub, digest)
        assert ranges == [(blob, size, 0) for blob, size in manifest.blobs.items()]
        messages = [m for data in {*files.values()} for m in blob_messages(digest, data)]
        for message in messages[1:]:
            message.context_digest = ""
        done = await stub.UploadBlobs(iter(messages))
        assert (done.stored_blobs, done.stored_bytes) == (4, len(BIG) + 22)
        assert (done.missing_blobs, done.missing_bytes) == (0, 0)
        stat = await stub.StatContext(build_pb2.StatContextRequest(digest=digest))
        assert stat.present and stat.size == len(manifest.encode())
        assert await missing(stub, digest) == []

        builder, nosy = (
            await coordinator.enrol("blob-builder"),
            await coordinator.enrol("blob-nosy"),
        )
        async with agent_stream(coordinator, builder) as (_, call):
            assert (await call.read()).WhichOneof("message") == "welcome"
            submitted = await stub.SubmitBuild(
                build_pb2.SubmitBuildRequest(
                    context_digest=digest, platforms=["linux/amd64"], tags=["127.0.0.1:1/a/b:c"]
                )
            )
            assert submitted.build.id
            assignment = await asyncio.wait_for(call.read(), 10)
            assert assignment.assign.context_digest == digest
            await check_agent_reads(builder, manifest, files)
            await check_refused(nosy, digest, [common_pb2.BlobRange(digest=sha(BIG))],
                                "holds no current assignment")  # fmt: skip
            await check_refused(builder, digest, [common_pb2.BlobRange(digest=sha(b"secret"))],
                                f"blob '{sha(b'secret')}' is not listed")  # fmt: skip
            await stub.CancelBuild(build_pb2.CancelBuildRequest(build_id=submitted.build.id))


async def check_agent_reads(
    identity: Identity, manifest: ContextManifest, files: dict[str, bytes]
) -> None:
    async with aio_channel(identity.agent_address, identity.trust()) as channel:
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        chunks = [
            c
            async for c in agents.FetchContext(
                agent_pb2.FetchContextRequest(digest=manifest.digest)
            )
        ]
        assert chunks[0].kind == common_pb2.CONTEXT_KIND_MANIFEST
        assert b"".join(c.data for c in chunks) == manifest.encode()
        wanted = [common_pb2.BlobRange(digest=d, size=s) for d, s in manifest.blobs.items()]
        wanted.append(common_pb2.BlobRange(digest=sha(BIG), size=len(BIG), offset=MIB + 3))
        request = agent_pb2.FetchBlobsRequest(context_digest=manifest.digest, blobs=wanted)
        got: list[tuple[str, int, bytearray]] = []
        async for chunk in agents.FetchBlobs(request):
            if chunk.digest:
                got.append((chunk.digest, chunk.offset, bytearray()))
            got[-1][2].extend(chunk.data)
        expected = [(d, 0, bytearray(next(v for v in files.values() if sha(v) == d)))
                    for d in manifest.blobs]  # fmt: skip
        expected.append((sha(BIG), MIB + 3, bytearray(BIG[MIB + 3 :])))
        assert got == expected


async def check_refused(
    identity: Identity, digest: str, blobs: list[common_pb2.BlobRange], details: str
) -> None:
    async with aio_channel(identity.agent_address, identity.trust()) as channel:
        request = agent_pb2.FetchBlobsRequest(context_digest=digest, blobs=blobs)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in agent_pb2_grpc.AgentServiceStub(channel).FetchBlobs(request):
                pass
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details in (refused.value.details() or "")


async def test_a_broken_blob_stream_resumes_from_what_the_coordinator_holds(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    data = os.urandom(3 * MIB)
    manifest = manifest_of({"src/resumed": data})
    partial = coordinator.data_dir / "contexts" / "partial" / sha(data)[7:]
    release = asyncio.Event()
    async with build_api(coordinator) as stub:
        await upload_manifest(stub, manifest)

        async def two_chunks_then_stall() -> AsyncIterator[build_pb2.UploadBlobsChunk]:
            for message in blob_messages(manifest.digest, data)[:2]:
                yield message
            await release.wait()

        call = stub.UploadBlobs(two_chunks_then_stall())
        await poll_until(lambda: partial.exists() and partial.stat().st_size == 2 * MIB,
                         timeout=10, message="two chunks written")  # fmt: skip
        call.cancel()  # the client goes away mid-blob
        release.set()
        expected = [(sha(data), len(data), 2 * MIB)]

        async def resumable() -> bool:
            return await missing(stub, manifest.digest) == expected

        # the stream's end releases the blob once its last write is on disk
        await poll_until(resumable, timeout=10, message="MissingBlobs reports the offset")
        messages = blob_messages(manifest.digest, data, offset=2 * MIB)
        done = await stub.UploadBlobs(iter(messages))
        assert (done.stored_blobs, done.missing_blobs) == (1, 0)
        stat = await stub.StatContext(build_pb2.StatContextRequest(digest=manifest.digest))
        assert stat.present and not partial.exists()


async def test_forged_unlisted_and_misplaced_blobs_are_refused(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    honest, big = b"honest content", os.urandom(2 * MIB)
    manifest = manifest_of({"src/file.txt": honest, "src/big": big})
    token = await coordinator.token(Role.CI)
    async with build_api(coordinator) as stub:
        await upload_manifest(stub, manifest)
    digest = manifest.digest
    forged = blob_messages(digest, b"forged content", digest=sha(honest))
    code, details = await asyncio.to_thread(upload_blobs_sync, coordinator, token, forged)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert sha(honest) in details and "'src/file.txt'" in details and "does not match" in details
    code, details = await asyncio.to_thread(
        upload_blobs_sync, coordinator, token, blob_messages(digest, b"not in the manifest")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"blob {sha(b'not in the manifest')} is not listed by context {digest}" in details
    code, details = await asyncio.to_thread(
        upload_blobs_sync, coordinator, token, blob_messages(digest, big, offset=MIB)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"resumes at offset {MIB}, but the coordinator holds 0 bytes" in details
    contexts = coordinator.data_dir / "contexts"
    for folder in ("blobs", "partial"):  # nothing stored, nothing kept to resume from
        names = os.listdir(contexts / folder)
        assert sha(honest)[7:] not in names and sha(big)[7:] not in names
    async with build_api(coordinator) as stub:
        assert len(await missing(stub, digest)) == 2
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SubmitBuild(
                build_pb2.SubmitBuildRequest(
                    context_digest=digest, platforms=["linux/amd64"], tags=["127.0.0.1:1/a/b:c"]
                )
            )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"context {digest} is missing 2 files" in (refused.value.details() or "")


async def test_manifests_over_the_limits_or_malformed_are_refused_naming_why(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    async with build_api(coordinator) as stub:
        big = common_pb2.ContextChunk(
            digest="sha256:" + "e" * 64, size=8 * 1024 + 1, kind=common_pb2.CONTEXT_KIND_MANIFEST
        )
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await stub.UploadContext(iter([big]))
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_manifest_bytes=8192" in (too_big.value.details() or "")
        many = manifest_of({f"src/f{i}": bytes([i]) for i in range(21)})
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            await upload_manifest(stub, many)
        assert too_many.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "22 entries: over the limit max_context_entries=20" in (
            too_many.value.details() or ""
        )
        escape = ContextManifest((ManifestEntry("link", "symlink", 0o777, 1, target="../etc"),))
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await upload_manifest(stub, escape)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "entry 'link' is a symlink to '../etc', which points outside" in (
            bad.value.details() or ""
        )
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await missing(stub, "sha256:" + "d" * 64)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "upload it first" in (unknown.value.details() or "")
    pending = coordinator.data_dir / "contexts" / "pending"
    assert not any(name in os.listdir(pending) for name in (many.digest[7:], escape.digest[7:]))


async def test_blob_uploads_count_against_the_callers_upload_slots(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    data = os.urandom(2 * MIB)
    manifest = manifest_of({"src/slow": data})
    release = asyncio.Event()
    async with build_api(coordinator) as stub:
        await upload_manifest(stub, manifest)

        async def stall() -> AsyncIterator[build_pb2.UploadBlobsChunk]:
            yield build_pb2.UploadBlobsChunk(context_digest=manifest.digest)
            await release.wait()

        held = [stub.UploadBlobs(stall()) for _ in range(PER_CALLER)]
        try:
            await poll_until(lambda: _in_flight(coordinator) >= PER_CALLER, timeout=5,
                             message="the caller's slots are taken")  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.UploadBlobs(
                    iter([build_pb2.UploadBlobsChunk(context_digest=manifest.digest)])
                )
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"max_concurrent_uploads_per_caller={PER_CALLER}" in (
                refused.value.details() or ""
            )
        finally:
            release.set()
            for call in held:
                call.cancel()


def _in_flight(coordinator: SecureCoordinator) -> float:
    for line in coordinator.metrics().splitlines():
        if line.startswith("polyarch_context_uploads_in_flight "):
            return float(line.split()[1])
    return 0.0

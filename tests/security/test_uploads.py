"""Probes of context upload limits against a real TLS coordinator: size, time, concurrency, fds.

Each probe asserts the exact gRPC status, and that the coordinator is still healthy after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from polyarch.proto.trust import Role
from polyarch.proto.v1 import build_pb2, build_pb2_grpc, common_pb2
from tests.support.poll import poll_until
from tests.support.secure_farm import SecureCoordinator, healthy, running_secure_coordinator

pytestmark = pytest.mark.security

MIB = 1 << 20
IDLE = 2.0  # upload_idle_seconds
DEADLINE = 6.0  # upload_deadline_seconds
PER_CALLER, TOTAL = 4, 6
LIMIT_ARGS = (
    "--limit",
    "max_context_bytes=1MiB",
    "--limit",
    f"upload_idle_seconds={IDLE:g}",
    "--limit",
    f"upload_deadline_seconds={DEADLINE:g}",
    "--limit",
    f"max_concurrent_uploads_per_caller={PER_CALLER}",
    "--limit",
    f"max_concurrent_uploads={TOTAL}",
)
Outcome = tuple[grpc.StatusCode, str, float]  # code, details, seconds until it ended


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCoordinator]:
    with running_secure_coordinator(tmp_path_factory.mktemp("uploads"), *LIMIT_ARGS) as running:
        yield running


@pytest.fixture
async def after_each_probe(coordinator: SecureCoordinator) -> AsyncIterator[None]:
    yield
    assert await asyncio.to_thread(healthy, coordinator), coordinator.log()[-3000:]
    assert stored_files(coordinator)[1] == [], "an upload left a temp file behind"


def stored_files(coordinator: SecureCoordinator) -> tuple[list[str], list[str]]:
    root = coordinator.data_dir / "contexts"
    return sorted(os.listdir(root / "sha256")), sorted(os.listdir(root / "tmp"))


def open_fds(coordinator: SecureCoordinator) -> int:
    return len(os.listdir(Path("/proc") / str(coordinator.proc.pid) / "fd"))


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def upload(stub: build_pb2_grpc.BuildServiceStub, chunks: AsyncIterator[bytes],
                 digest: str, size: int) -> Outcome:  # fmt: skip
    """One UploadContext call: the first chunk carries digest and size, as clients send it."""

    async def messages() -> AsyncIterator[common_pb2.ContextChunk]:
        first = True
        async for data in chunks:
            if first:
                yield common_pb2.ContextChunk(digest=digest, size=size, data=data)
                first = False
            else:
                yield common_pb2.ContextChunk(data=data)

    started = time.monotonic()
    try:
        await stub.UploadContext(messages(), timeout=60)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", time.monotonic() - started
    return grpc.StatusCode.OK, "", time.monotonic() - started


async def parts(*datas: bytes) -> AsyncIterator[bytes]:
    for data in datas:
        yield data


async def stall_after(data: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    """One chunk, then nothing until `release` (the attack: 1000 of these exhausted fds)."""
    yield data
    await release.wait()


class SyncUploads:
    """UploadContext through grpc's sync API on one connection, calls run in threads.

    The asyncio client reports INTERNAL "Internal error from Core" instead of the server's
    status when the server ends a client-streaming RPC while a write is still in flight
    (grpc/grpc#36066), which is exactly what a refusal at once does; the sync API reports
    the server's status, so every probe that is refused while still writing uses this.
    """

    def __init__(self, coordinator: SecureCoordinator, token: str) -> None:
        trust = coordinator.trust(token)
        credentials = trust.credentials()
        assert credentials is not None
        self.channel = grpc.secure_channel(
            coordinator.address, credentials, trust.channel_options()
        )
        self.stub = build_pb2_grpc.BuildServiceStub(self.channel)
        self.stub.StatContext(build_pb2.StatContextRequest(digest="sha256:" + "0" * 64))

    def call(self, chunks: Iterable[bytes], digest: str, size: int) -> Outcome:
        def messages() -> Iterator[common_pb2.ContextChunk]:
            for index, data in enumerate(chunks):
                if index == 0:
                    yield common_pb2.ContextChunk(digest=digest, size=size, data=data)
                else:
                    yield common_pb2.ContextChunk(data=data)

        started = time.monotonic()
        try:
            self.stub.UploadContext(messages(), timeout=60)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return exc.code(), exc.details() or "", time.monotonic() - started
        return grpc.StatusCode.OK, "", time.monotonic() - started

    async def start(self, chunks: Iterable[bytes], digest: str, size: int) -> Outcome:
        return await asyncio.get_running_loop().run_in_executor(
            _THREADS, self.call, chunks, digest, size
        )


_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="sync-upload")


def sync_stall_after(data: bytes, release: threading.Event) -> Iterator[bytes]:
    """One chunk, then nothing until `release` (the attack: 1000 of these exhausted fds)."""
    yield data
    release.wait(60)


@contextlib.contextmanager
def sync_uploads(coordinator: SecureCoordinator, token: str) -> Iterator[SyncUploads]:
    uploads = SyncUploads(coordinator, token)
    try:
        yield uploads
    finally:
        uploads.channel.close()


class Firehose:
    """64 KiB chunks without pause, up to 512 MiB; counts what the client handed to gRPC."""

    def __init__(self) -> None:
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < 512 * MIB:
            self.sent += 64 * 1024
            yield b"\0" * (64 * 1024)


async def test_a_declared_size_over_the_limit_is_refused_before_a_byte_is_written(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    token = await coordinator.token(Role.CI)
    release = asyncio.Event()
    async with coordinator.channel(token) as channel:
        stub = build_pb2_grpc.BuildServiceStub(channel)
        for declared in (1 << 62, MIB + 1):
            stalled = stall_after(b"x" * 1024, release)
            code, details, seconds = await upload(stub, stalled, "sha256:" + "e" * 64, declared)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert f"{declared} bytes" in details and f"max_context_bytes={MIB}" in details
            assert seconds < IDLE, "refused only when the stream went idle"
    release.set()
    # The attack itself: 2^62 declared, then bytes as fast as the connection takes them.
    firehose = Firehose()
    with sync_uploads(coordinator, token) as sync:
        code, details, _ = await sync.start(firehose, "sha256:" + "e" * 64, 1 << 62)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert firehose.sent < 64 * MIB, f"{firehose.sent} bytes were sent before the refusal"
    assert stored_files(coordinator) == ([], [])


async def test_sending_more_or_fewer_bytes_than_declared_is_refused(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    token = await coordinator.token(Role.CI)
    release = asyncio.Event()
    async with coordinator.channel(token) as channel:
        stub = build_pb2_grpc.BuildServiceStub(channel)
        # One byte over, then a pause: refused at that chunk, not at the end of the stream.
        over = stall_after(b"o" * 1001, release)
        code, details, seconds = await upload(stub, over, "sha256:" + "f" * 64, 1000)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "exceeds its declared size 1000" in details and seconds < IDLE
        data = b"short" * 100
        code, details, _ = await upload(stub, parts(data[:200]), digest_of(data), len(data))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "(200 bytes)" in details
    release.set()
    firehose = Firehose()
    with sync_uploads(coordinator, token) as sync:
        code, details, _ = await sync.start(firehose, "sha256:" + "f" * 64, 100_000)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "exceeds its declared size 100000" in details
    assert firehose.sent < 64 * MIB, f"{firehose.sent} bytes were sent before the refusal"
    assert stored_files(coordinator) == ([], [])


async def test_stalled_uploads_are_capped_per_caller_and_end_after_the_idle_limit(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    attacker, other = await coordinator.token(Role.CI), await coordinator.token(Role.CI)
    release = threading.Event()
    async with coordinator.channel(other) as good:
        good_stub = build_pb2_grpc.BuildServiceStub(good)
        await good_stub.StatContext(build_pb2.StatContextRequest(digest="sha256:" + "0" * 64))
        with sync_uploads(coordinator, attacker) as bad:
            # Both connections are up before the baseline, so it counts their sockets.
            baseline = open_fds(coordinator)
            stalled = [
                asyncio.ensure_future(
                    bad.start(sync_stall_after(b"x" * 10, release), "sha256:" + "1" * 64, 1000)
                )
                for _ in range(20)
            ]
            # The 16 over the cap are refused at once, well before the idle limit.
            await poll_until(
                lambda: sum(t.done() for t in stalled) >= 20 - PER_CALLER,
                timeout=IDLE * 0.75,
                message="uploads over the cap refused at once",
            )
            refused = [t.result() for t in stalled if t.done()]
            assert len(refused) == 20 - PER_CALLER
            for code, details, _ in refused:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                assert f"max_concurrent_uploads_per_caller={PER_CALLER}" in details
            during = open_fds(coordinator)
            # Another caller still uploads and lists while the attacker holds its slots.
            data = os.urandom(300_000)
            chunks = parts(data[:100_000], data[100_000:])
            code, details, _ = await upload(good_stub, chunks, digest_of(data), len(data))
            assert code == grpc.StatusCode.OK, details
            await good_stub.ListBuilds(build_pb2.ListBuildsRequest())
            # The stalled ones end after the idle limit, and their temp files go.
            try:
                outcomes = await asyncio.wait_for(asyncio.gather(*stalled), timeout=IDLE * 5)
            finally:
                release.set()
            ended = [o for o in outcomes if o not in refused]
            assert len(ended) == PER_CALLER
            for code, details, seconds in ended:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                assert f"upload_idle_seconds={IDLE:g}" in details
                assert IDLE * 0.9 <= seconds <= IDLE * 4
            assert stored_files(coordinator) == ([digest_of(data)[7:]], [])
            await poll_until(
                lambda: open_fds(coordinator) <= baseline,
                timeout=10,
                message=f"coordinator fds back to the baseline {baseline}",
            )
            # The attacker's own slots are free again.
            data = b"after the stall"
            code, details, _ = await bad.start([data], digest_of(data), len(data))
            assert code == grpc.StatusCode.OK, details
    print(f"fds: baseline {baseline}, with {PER_CALLER} stalled uploads {during}")
    assert during <= baseline + PER_CALLER + 2


async def test_the_total_cap_holds_across_callers(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    tokens = [await coordinator.token(Role.CI) for _ in range(3)]
    release = threading.Event()
    with (
        sync_uploads(coordinator, tokens[0]) as one,
        sync_uploads(coordinator, tokens[1]) as two,
        sync_uploads(coordinator, tokens[2]) as three,
    ):
        held = [
            asyncio.ensure_future(
                caller.start(sync_stall_after(b"y", release), "sha256:" + "2" * 64, 9)
            )
            for caller in [one] * PER_CALLER + [two] * (TOTAL - PER_CALLER)
        ]
        try:
            await poll_until(
                lambda: _in_flight(coordinator) == TOTAL,
                timeout=IDLE * 0.75,
                message="every slot taken",
            )
            data = b"third caller"
            code, details, _ = await three.start([data], digest_of(data), len(data))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert f"max_concurrent_uploads={TOTAL}" in details
        finally:
            release.set()  # the held uploads now end their streams short: undersent
        for code, details, _ in await asyncio.wait_for(asyncio.gather(*held), IDLE * 5):
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        code, details, _ = await three.start([data], digest_of(data), len(data))
        assert code == grpc.StatusCode.OK, details


def _in_flight(coordinator: SecureCoordinator) -> bool | float:
    for line in coordinator.metrics().splitlines():
        if line.startswith("polyarch_context_uploads_in_flight "):
            return float(line.split()[1])
    return False


async def test_a_trickling_upload_ends_at_the_deadline(
    coordinator: SecureCoordinator, after_each_probe: None
) -> None:
    def trickle() -> Iterator[bytes]:
        for _ in range(1000):  # each chunk within the idle limit, the whole far beyond DEADLINE
            yield b"t"
            time.sleep(IDLE / 4)

    with sync_uploads(coordinator, await coordinator.token(Role.CI)) as sync:
        code, details, seconds = await sync.start(trickle(), "sha256:" + "3" * 64, 1000)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert f"upload_deadline_seconds={DEADLINE:g}" in details
    assert DEADLINE * 0.9 <= seconds <= DEADLINE * 2

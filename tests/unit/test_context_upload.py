"""Incremental context upload against an in-memory BuildService: only missing blobs go, a
broken stream resumes, old coordinators get the tar, a changed file is named; the bar."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from polyarch.client import context_upload
from polyarch.client.api import BuildClient, PolyarchError
from polyarch.client.context import ContextError, pack_context
from polyarch.client.context_manifest import ManifestContext, build_manifest
from polyarch.client.context_upload import send_context
from polyarch.client.credentials import Credentials
from polyarch.client.file_hashes import FileHashes
from polyarch.client.upload_progress import (
    BAR_MIN_BYTES,
    UploadProgress,
    human_bytes,
    render_bar,
    summary_line,
)
from polyarch.proto.context_manifest import ContextManifest
from polyarch.proto.v1 import build_pb2, build_pb2_grpc, common_pb2

MIB = 1 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class OldCoordinator(build_pb2_grpc.BuildServiceServicer):
    """A coordinator from before manifests: tars only, no MissingBlobs or UploadBlobs."""

    contexts: dict[str, bytes] = field(default_factory=dict)  # digest -> tar or manifest
    max_bytes: int = 0

    async def StatContext(self, request: Any, context: Any) -> build_pb2.StatContextResponse:
        return build_pb2.StatContextResponse(
            present=self.present(request.digest), max_bytes=self.max_bytes
        )

    def present(self, digest: str) -> bool:
        return digest in self.contexts

    async def UploadContext(self, request_iterator: Any, context: Any) -> Any:
        chunks = [chunk async for chunk in request_iterator]
        data = b"".join(chunk.data for chunk in chunks)
        digest = chunks[0].digest
        if sha256(data) != digest or len(data) != chunks[0].size:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "context does not match")
        return self.store(digest, data, chunks[0].kind)

    def store(self, digest: str, data: bytes, kind: int) -> build_pb2.UploadContextResponse:
        self.contexts[digest] = data  # an old coordinator reads no kind: all are tars
        return build_pb2.UploadContextResponse(digest=digest, size=len(data))


@dataclass
class BlobCoordinator(OldCoordinator):
    """The contract of incremental contexts, from dicts; `break_at[digest] = n` aborts the
    stream (UNAVAILABLE) once n bytes of that blob are held, keeping them as verified."""

    manifests: dict[str, ContextManifest] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    partial: dict[str, bytearray] = field(default_factory=dict)
    break_at: dict[str, int] = field(default_factory=dict)
    received: int = 0  # blob bytes received
    streams: int = 0  # UploadBlobs calls
    starts: list[tuple[str, int]] = field(default_factory=list)  # (digest, offset) begun

    def present(self, digest: str) -> bool:
        if digest in self.manifests:
            return not self.missing(digest)
        return digest in self.contexts

    def missing(self, digest: str) -> dict[str, int]:
        blobs = self.manifests[digest].blobs
        return {d: size for d, size in blobs.items() if d not in self.blobs}

    def store(self, digest: str, data: bytes, kind: int) -> build_pb2.UploadContextResponse:
        if kind != common_pb2.CONTEXT_KIND_MANIFEST:
            return super().store(digest, data, kind)
        self.manifests[digest] = ContextManifest.decode(data)
        missing = self.missing(digest)
        return build_pb2.UploadContextResponse(
            digest=digest, size=len(data), missing_blobs=len(missing),
            missing_bytes=sum(missing.values()),
        )  # fmt: skip

    async def MissingBlobs(self, request: Any, context: Any) -> AsyncIterator[common_pb2.BlobRange]:
        if request.context_digest not in self.manifests:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such manifest")
        for digest, size in self.missing(request.context_digest).items():
            offset = len(self.partial.get(digest, b""))
            yield common_pb2.BlobRange(digest=digest, size=size, offset=offset)

    async def UploadBlobs(self, request_iterator: Any, context: Any) -> Any:
        self.streams += 1
        manifest: ContextManifest | None = None
        current, size, held = "", 0, bytearray()  # this stream's blob (two may send one)
        async for message in request_iterator:
            if manifest is None:
                manifest = self.manifests[message.context_digest]
            blob = message.blob
            if blob.digest:
                held = self.partial.pop(blob.digest, bytearray())
                if manifest.blobs.get(blob.digest) != blob.size or blob.offset != len(held):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad blob start")
                current, size = blob.digest, blob.size
                self.starts.append((current, blob.offset))
            held.extend(blob.data)
            self.received += len(blob.data)
            if self.break_at.get(current, size + 1) <= len(held):
                del self.break_at[current]
                self.partial[current] = held  # kept, as verified, for a resume
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer")
            if len(held) == size:
                if sha256(bytes(held)) != current:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"blob {current} does not match"
                    )
                self.blobs[current] = bytes(held)
        assert manifest is not None
        missing = self.missing(manifest.digest)
        return build_pb2.UploadBlobsResponse(
            missing_blobs=len(missing), missing_bytes=sum(missing.values())
        )


class Server:
    """A grpc.aio server on 127.0.0.1:0 in a thread of its own, so tests may drive it from
    their own event loop or through the CLI's asyncio.run."""

    def __init__(self, servicer: OldCoordinator) -> None:
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = None
        self.address = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> str:
        self.server = grpc.aio.server()
        build_pb2_grpc.add_BuildServiceServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(autouse=True)
def plaintext(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYARCH_INSECURE", "1")
    for name in ("POLYARCH_TOKEN", "POLYARCH_TOKEN_FILE", "POLYARCH_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    # retries after a broken stream wait a moment, not the CLI's backoff
    monkeypatch.setattr(context_upload, "backoff_delay", lambda *args, **kwargs: 0.01)


@pytest.fixture
def coordinator() -> Iterator[Server]:
    server = Server(BlobCoordinator())
    yield server
    server.stop()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    (root / "src").mkdir(parents=True)
    (root / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    (root / "src" / "a.txt").write_text("same\n")
    (root / "src" / "b.txt").write_text("same\n")  # one blob for two files
    (root / "src" / "big.bin").write_bytes(os.urandom(3 * MIB + 5))
    (root / "empty").write_bytes(b"")
    (root / "src" / "link").symlink_to("a.txt")
    return root


def manifest_of(root: Path) -> ManifestContext:
    return build_manifest(root, hashes=FileHashes(None))


async def send(server: Server, context: ManifestContext, **kwargs: Any) -> Any:
    async with BuildClient(server.address, credentials=Credentials(insecure=True)) as client:
        return await send_context(client, context, **kwargs)


async def test_a_first_upload_sends_each_content_once_then_the_context_is_present(
    coordinator: Server, tree: Path
) -> None:
    context = manifest_of(tree)
    shown = io.StringIO()
    sent = await send(coordinator, context, progress=UploadProgress(shown, "plain"))
    fake = coordinator.servicer
    assert isinstance(fake, BlobCoordinator)
    assert (sent.digest, sent.dockerfile, sent.as_tar) == (context.digest, "Dockerfile", False)
    assert sent.sent_blobs == 4  # Dockerfile, "same\n" once, big.bin, the empty file
    assert fake.received == context.manifest.blob_bytes < context.total_bytes
    assert fake.streams == 1  # every blob in one stream
    assert fake.blobs[sha256(b"same\n")] == b"same\n"
    assert fake.blobs[sha256(b"")] == b""
    assert fake.present(context.digest)
    assert shown.getvalue() == (
        summary_line(5, context.total_bytes, 4, context.manifest.blob_bytes) + "\n"
    )

    shown = io.StringIO()
    again = await send(coordinator, manifest_of(tree), progress=UploadProgress(shown, "plain"))
    assert again.present and again.sent_bytes == 0 and fake.streams == 1
    assert shown.getvalue() == f"context {context.digest} already on the coordinator\n"


async def test_only_the_changed_file_is_sent(coordinator: Server, tree: Path) -> None:
    await send(coordinator, manifest_of(tree))
    fake = coordinator.servicer
    assert isinstance(fake, BlobCoordinator)
    before = fake.received
    (tree / "src" / "a.txt").write_text("changed, and longer\n")
    (tree / "src" / "new.txt").write_text("same\n")  # known content: nothing to send
    sent = await send(coordinator, manifest_of(tree))
    assert (sent.sent_blobs, sent.sent_bytes) == (1, len("changed, and longer\n"))
    assert fake.received - before == len("changed, and longer\n")
    assert fake.present(sent.digest)


async def test_a_stream_broken_mid_blob_resumes_from_the_coordinators_offset(
    coordinator: Server, tree: Path
) -> None:
    fake = coordinator.servicer
    assert isinstance(fake, BlobCoordinator)
    big = (tree / "src" / "big.bin").read_bytes()
    fake.break_at[sha256(big)] = 2 * MIB
    sent = await send(coordinator, manifest_of(tree))
    assert fake.blobs[sha256(big)] == big
    assert fake.streams == 2
    assert (sha256(big), 2 * MIB) in fake.starts  # the second stream began where it broke
    # nothing the coordinator kept went twice; what gRPC had taken past the break did
    assert fake.received == manifest_of(tree).manifest.blob_bytes <= sent.sent_bytes


async def test_an_old_coordinator_gets_the_tar_and_no_manifest(tree: Path) -> None:
    server = Server(OldCoordinator())
    try:
        context = manifest_of(tree)
        shown = io.StringIO()
        sent = await send(server, context, progress=UploadProgress(shown, "plain"))
    finally:
        server.stop()
    packed = pack_context(tree)
    packed.discard()
    assert sent.as_tar and (sent.digest, sent.dockerfile) == (packed.digest, "Dockerfile")
    assert list(server.servicer.contexts) == [packed.digest]  # no manifest stored as a tar
    assert shown.getvalue() == f"context {packed.digest} ({packed.size} bytes) uploaded\n"


class NoManifests(BlobCoordinator):
    """Knows the blob RPCs, but refuses the manifest kind as not implemented."""

    async def UploadContext(self, request_iterator: Any, context: Any) -> Any:
        chunks = [chunk async for chunk in request_iterator]
        if chunks[0].kind == common_pb2.CONTEXT_KIND_MANIFEST:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "manifests are off here")
        return self.store(chunks[0].digest, b"".join(c.data for c in chunks), chunks[0].kind)


class AlwaysBreaks(BlobCoordinator):
    """Every UploadBlobs stream breaks before a byte is kept."""

    async def UploadBlobs(self, request_iterator: Any, context: Any) -> Any:
        self.streams += 1
        await anext(request_iterator)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer")


async def test_a_coordinator_refusing_the_manifest_kind_gets_the_tar(tree: Path) -> None:
    server = Server(NoManifests())
    try:
        sent = await send(server, manifest_of(tree))
    finally:
        server.stop()
    assert sent.as_tar and list(server.servicer.contexts) == [sent.digest]


async def test_an_upload_that_never_progresses_gives_up_saying_so(tree: Path) -> None:
    fake = AlwaysBreaks()
    server = Server(fake)
    try:
        with pytest.raises(PolyarchError, match="failed 5 times in a row without progress"):
            await send(server, manifest_of(tree))
    finally:
        server.stop()
    assert fake.streams == context_upload.MAX_FAILURES


async def test_a_file_changed_after_hashing_is_named(coordinator: Server, tree: Path) -> None:
    context = manifest_of(tree)
    victim = tree / "src" / "big.bin"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, same inode: only the coordinator's digest check sees it
    victim.write_bytes(data)
    says = f"{victim} changed while the context was being sent; run again"
    with pytest.raises(ContextError, match=re.escape(says)):
        await send(coordinator, context)


async def test_a_file_that_shrank_after_hashing_is_named(coordinator: Server, tree: Path) -> None:
    context = manifest_of(tree)
    victim = tree / "src" / "big.bin"
    victim.write_bytes(victim.read_bytes()[:MIB])
    says = f"{victim} changed while the context was being sent; run again"
    with pytest.raises(ContextError, match=re.escape(says)):
        await send(coordinator, context)


async def test_a_context_over_the_coordinators_limit_is_refused_before_sending(
    coordinator: Server, tree: Path
) -> None:
    coordinator.servicer.max_bytes = MIB
    with pytest.raises(PolyarchError, match="this coordinator accepts at most 1048576") as exc:
        await send(coordinator, manifest_of(tree))
    assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not coordinator.servicer.contexts


async def test_many_small_files_go_in_one_stream(coordinator: Server, tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    (root / "Dockerfile").write_text("FROM scratch\n")
    for n in range(500):
        (root / f"f{n:03}").write_text(f"file {n}\n")
    sent = await send(coordinator, manifest_of(root))
    fake = coordinator.servicer
    assert isinstance(fake, BlobCoordinator)
    assert sent.sent_blobs == 501 and fake.streams == 1 and fake.present(sent.digest)


INDEX = "sha256:" + "1" * 64


class Farm(BlobCoordinator):
    """Enough of a coordinator for `polyarch build`: a submit needs a complete context."""

    submitted: list[build_pb2.SubmitBuildRequest]

    async def SubmitBuild(self, request: Any, context: Any) -> build_pb2.SubmitBuildResponse:
        if not self.present(request.context_digest):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "context incomplete")
        self.submitted = [*getattr(self, "submitted", []), request]
        return build_pb2.SubmitBuildResponse(build=build_pb2.Build(id="b-1"))

    async def WatchBuild(self, request: Any, context: Any) -> AsyncIterator[build_pb2.BuildEvent]:
        done = common_pb2.BUILD_STATE_SUCCEEDED
        yield build_pb2.BuildEvent(build=build_pb2.Build(id="b-1", state=done, index_digest=INDEX))


def test_polyarch_build_sends_a_manifest_and_submits_its_digest(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from polyarch.client import cli

    monkeypatch.setenv("POLYARCH_CACHE_DIR", str(tmp_path / "cache"))
    farm = Farm()
    server = Server(farm)
    try:
        argv = ["build", "--coordinator", server.address, "--platform", "linux/amd64",
                "--output", "type=image,push=false", "--progress", "plain", str(tree)]  # fmt: skip
        assert cli.main(argv) == 0
        first = capsys.readouterr()
        assert cli.main(argv) == 0
        second = capsys.readouterr()
    finally:
        server.stop()
    context = manifest_of(tree)
    assert [r.context_digest for r in farm.submitted] == [context.digest] * 2
    assert farm.submitted[0].dockerfile == "Dockerfile"
    assert first.out == second.out == INDEX + "\n"
    assert first.err.startswith("context: 5 files, 3.1 MB; sending 4 files, 3.1 MB\n")
    assert second.err.startswith(f"context {context.digest} already on the coordinator\n")
    assert (tmp_path / "cache" / "file-hashes.sqlite3").is_file()


def test_polyarch_bake_sends_each_context_once_and_an_inline_dockerfile_too(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from polyarch.client import cli

    monkeypatch.setenv("POLYARCH_CACHE_DIR", str(tmp_path / "cache"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    common = {"context": str(tree), "platforms": ["linux/amd64"], "tags": ["r.example/a:1"],
              "output": ["type=image,push=false"]}  # fmt: skip
    bake_file = tmp_path / "docker-bake.json"
    bake_file.write_text(json.dumps({"target": {
        "app": common, "again": common,
        "inline": {**common, "dockerfile-inline": "FROM scratch\nLABEL inline=1\n"},
    }, "group": {"default": {"targets": ["app", "again", "inline"]}}}))  # fmt: skip
    farm = Farm()
    server = Server(farm)
    try:
        argv = ["bake", "--coordinator", server.address, "-f", str(bake_file), "--progress",
                "plain"]  # fmt: skip
        assert cli.main(argv) == 0
    finally:
        server.stop()
    err = capsys.readouterr().err
    digests = {r.context_digest: r.dockerfile for r in farm.submitted}
    assert len(farm.submitted) == 3 and len(digests) == 2
    assert digests[manifest_of(tree).digest] == "Dockerfile"
    assert ".polyarch/Dockerfile" in digests.values()
    assert err.count("context: 5 files") == 1  # app and again share one upload
    assert farm.blobs[sha256(b"FROM scratch\nLABEL inline=1\n")]
    assert not list(scratch.iterdir())  # the inline Dockerfile's folder is gone


def test_human_bytes_and_the_summary_line() -> None:
    assert [human_bytes(n) for n in (0, 999, 1000, 1_234_567, 200_000_000, 10**12)] == [
        "0 B", "999 B", "1.0 kB", "1.2 MB", "200.0 MB", "1.0 TB",
    ]  # fmt: skip
    assert human_bytes(999_999) == "1.0 MB"  # never "1000.0 kB"
    assert summary_line(12_345, 200_000_000, 1, 1_000_000) == (
        "context: 12,345 files, 200.0 MB; sending 1 file, 1.0 MB"
    )


def test_the_bar_fills_with_the_bytes_sent_and_fits_the_width() -> None:
    half = render_bar(50_000_000, 100_000_000, 25_000_000, 80)
    assert half.startswith("context [")
    bar = half[len("context [") : half.index("]")]
    assert bar.count("#") == len(bar) // 2 and bar.count("-") == len(bar) - len(bar) // 2
    assert len(bar) >= 10
    assert half.endswith(" 50.0 MB / 100.0 MB  25.0 MB/s") and len(half) <= 79
    assert "-" not in render_bar(100, 100, 1.0, 80).split("]")[0]
    assert "#" not in render_bar(0, 100, 0.0, 80).split("]")[0]
    assert len(render_bar(99, 100, 1.0, 30)) <= 29  # a narrow terminal cuts the line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_tty_bar_redraws_at_most_ten_times_a_second_and_keeps_its_final_state() -> None:
    out, clock = io.StringIO(), Clock()
    progress = UploadProgress(out, "tty", clock=clock, width=lambda: 80)
    total = 100 * MIB
    progress.start(total)
    for _ in range(100):  # 100 updates within 0.5 s: 5 redraws at most
        clock.now += 0.005
        progress.advance(MIB)
    assert 1 <= out.getvalue().count("\r") <= 5
    clock.now += 1
    progress.finish()
    final = out.getvalue().rsplit("\r", 1)[-1]
    assert final.startswith("context [" + "#" * 10) and final.endswith("\x1b[K\n")
    assert f"{human_bytes(total)} / {human_bytes(total)}" in final


def test_small_uploads_draw_no_bar_and_quiet_says_nothing() -> None:
    out = io.StringIO()
    progress = UploadProgress(out, "tty", width=lambda: 80)
    progress.start(BAR_MIN_BYTES)
    progress.advance(BAR_MIN_BYTES)
    progress.finish()
    assert out.getvalue() == ""
    quiet = UploadProgress(out, "quiet")
    quiet.note("context: 1 file")
    quiet.start(10 * BAR_MIN_BYTES)
    quiet.advance(10 * BAR_MIN_BYTES)
    quiet.finish()
    assert out.getvalue() == ""


def test_plain_progress_says_a_line_every_ten_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    progress = UploadProgress(out, "plain", clock=clock)
    progress.start(100 * MIB)
    for _ in range(25):
        clock.now += 1
        progress.advance(MIB)
    lines = out.getvalue().splitlines()
    assert lines == ["context: sent 10.5 MB of 104.9 MB", "context: sent 21.0 MB of 104.9 MB"]


def test_the_tar_of_a_manifest_context_is_the_same_tree(tree: Path) -> None:
    context = manifest_of(tree)
    packed = context.pack()
    try:
        with tarfile.open(packed.path) as archive:
            names = sorted(member.name for member in archive.getmembers())
    finally:
        packed.discard()
    assert names == sorted(entry.path for entry in context.manifest.entries)

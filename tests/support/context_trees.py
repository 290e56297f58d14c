"""Context trees for the agent's manifest tests: a manifest of a real folder, a snapshot to
compare laid-out trees with, and an in-process AgentService serving contexts and blobs."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc

from polyarch.proto.context_manifest import ContextManifest, ManifestEntry
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc, common_pb2

Snapshot = dict[str, tuple[str, int, int, bytes]]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_of_tree(root: Path) -> tuple[ContextManifest, dict[str, bytes]]:
    """The manifest of every object under `root` (lstat: symlinks as symlinks), and the
    file contents by digest."""
    entries: list[ManifestEntry] = []
    contents: dict[str, bytes] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            info = path.lstat()
            mode, mtime = stat.S_IMODE(info.st_mode), int(info.st_mtime)
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(path)
                entries.append(ManifestEntry(relative, "symlink", mode, mtime, target=target))
            elif stat.S_ISDIR(info.st_mode):
                entries.append(ManifestEntry(relative, "dir", mode, mtime))
            else:
                data = path.read_bytes()
                contents[digest_of(data)] = data
                entries.append(
                    ManifestEntry(relative, "file", mode, mtime, len(data), digest_of(data))
                )
    return ContextManifest.from_entries(entries), contents


def snapshot(root: Path) -> Snapshot:
    """path -> (kind, permission bits, mtime in ns, content or symlink target) below root."""
    found: Snapshot = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            key = path.relative_to(root).as_posix()
            mode, mtime = stat.S_IMODE(info.st_mode), info.st_mtime_ns
            if stat.S_ISLNK(info.st_mode):
                found[key] = ("symlink", mode, mtime, os.readlink(path).encode())
            elif stat.S_ISDIR(info.st_mode):
                found[key] = ("dir", mode, mtime, b"")
            else:
                found[key] = ("file", mode, mtime, path.read_bytes())
    return found


class ContextSource(agent_pb2_grpc.AgentServiceServicer):
    """The coordinator's side of FetchContext and FetchBlobs, from memory, with faults:
    `tampered` serves other bytes for a digest; `break_after` aborts a blob stream once
    that many blob bytes went out (in total, across calls)."""

    def __init__(self, chunk: int = 64 << 10) -> None:
        self.chunk = chunk
        self.contexts: dict[str, tuple[common_pb2.ContextKind, bytes]] = {}
        self.manifests: dict[str, ContextManifest] = {}
        self.blobs: dict[str, bytes] = {}
        self.tampered: dict[str, bytes] = {}
        self.break_after: int | None = None
        self.context_calls = 0
        self.blob_requests: list[list[tuple[str, int, int]]] = []
        self.blob_bytes_sent = 0

    def add_manifest(self, manifest: ContextManifest, contents: dict[str, bytes]) -> str:
        self.contexts[manifest.digest] = (common_pb2.CONTEXT_KIND_MANIFEST, manifest.encode())
        self.manifests[manifest.digest] = manifest
        self.blobs.update(contents)
        return manifest.digest

    def add_tar(self, data: bytes) -> str:
        self.contexts[digest_of(data)] = (common_pb2.CONTEXT_KIND_TAR, data)
        return digest_of(data)

    async def FetchContext(
        self, request: agent_pb2.FetchContextRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[common_pb2.ContextChunk]:
        self.context_calls += 1
        if request.digest not in self.contexts:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no context {request.digest}")
        kind, data = self.contexts[request.digest]
        for start in range(0, max(len(data), 1), self.chunk):
            # the kind goes in the first chunk only
            piece = data[start : start + self.chunk]
            yield common_pb2.ContextChunk(data=piece, kind=kind)
            kind = common_pb2.CONTEXT_KIND_TAR

    async def FetchBlobs(
        self, request: agent_pb2.FetchBlobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[common_pb2.BlobChunk]:
        manifest = self.manifests.get(request.context_digest)
        if manifest is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not a manifest context")
        assert manifest is not None
        self.blob_requests.append([(r.digest, r.size, r.offset) for r in request.blobs])
        for wanted in request.blobs:
            if manifest.blobs.get(wanted.digest) != wanted.size:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not listed: {wanted}")
            data = self.tampered.get(wanted.digest, self.blobs[wanted.digest])
            position, first = wanted.offset, True
            while first or position < len(data):
                piece = data[position : position + self.chunk]
                if self.break_after is not None:
                    piece = piece[: max(0, self.break_after - self.blob_bytes_sent)]
                self.blob_bytes_sent += len(piece)
                yield common_pb2.BlobChunk(
                    digest=wanted.digest if first else "", size=wanted.size if first else 0,
                    offset=wanted.offset if first else 0, data=piece,
                )  # fmt: skip
                if self.break_after is not None and self.blob_bytes_sent >= self.break_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
                position += len(piece)
                first = False


@asynccontextmanager
async def serving(source: ContextSource) -> AsyncIterator[agent_pb2_grpc.AgentServiceStub]:
    """A real gRPC server on 127.0.0.1 serving `source`, and a stub connected to it."""
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(source, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield agent_pb2_grpc.AgentServiceStub(channel)
    finally:
        await server.stop(None)

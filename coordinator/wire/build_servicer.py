"""BuildService: the API CI clients call; protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from polyarch.coordinator.contexts.blob_uploads import BlobReceiver
from polyarch.coordinator.contexts.blobs import BlobPiece
from polyarch.coordinator.contexts.store import ManifestReceipt, check_digest
from polyarch.coordinator.contexts.uploads import bounded_upload
from polyarch.coordinator.core.manager import BuildManager
from polyarch.coordinator.core.model import InvalidRequest, PolyarchError
from polyarch.coordinator.exports.exporter import BuildExporter
from polyarch.coordinator.registry.build_credentials import check_build_credentials, client_for
from polyarch.coordinator.registry.client import RegistryError
from polyarch.coordinator.trust.auth import current_principal
from polyarch.coordinator.wire import convert
from polyarch.coordinator.wire.errors import domain_errors, status_code
from polyarch.coordinator.wire.listing import list_page
from polyarch.proto.trust import Role
from polyarch.proto.v1 import build_pb2, build_pb2_grpc, common_pb2


class BuildServicer(build_pb2_grpc.BuildServiceServicer):
    def __init__(self, manager: BuildManager, exporter: BuildExporter) -> None:
        self.manager = manager
        self.exporter = exporter

    @domain_errors
    async def StatContext(
        self, request: build_pb2.StatContextRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> build_pb2.StatContextResponse:
        contexts = self.manager.contexts
        size = contexts.size_of(check_digest(request.digest))
        return build_pb2.StatContextResponse(
            present=size is not None, size=size or 0,
            max_bytes=contexts.limits.max_context_bytes,
        )  # fmt: skip

    @domain_errors
    async def UploadContext(
        self,
        request_iterator: AsyncIterator[common_pb2.ContextChunk],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> build_pb2.UploadContextResponse:
        contexts = self.manager.contexts
        limits = contexts.limits
        metrics = self.manager.metrics
        caller = current_principal().token_id
        async with bounded_upload(contexts.uploads, limits, caller, request_iterator) as messages:
            first = await anext(messages, None)
            if first is None or not first.digest or first.size < 0:
                raise InvalidRequest(
                    "the first upload chunk must carry the context digest and size"
                )

            async def chunks() -> AsyncGenerator[bytes, None]:
                metrics.context_bytes_received.inc(len(first.data))
                yield first.data
                async for chunk in messages:
                    metrics.context_bytes_received.inc(len(chunk.data))
                    yield chunk.data

            async with contextlib.aclosing(chunks()) as data:
                if first.kind == common_pb2.CONTEXT_KIND_MANIFEST:
                    receipt = await contexts.write_manifest(first.digest, first.size, data)
                elif first.kind == common_pb2.CONTEXT_KIND_TAR:
                    stored = await contexts.write(first.digest, first.size, data)
                    receipt = ManifestReceipt(already_present=not stored)
                else:
                    raise InvalidRequest(f"unknown context kind {first.kind}")
        if receipt.listed_blobs:
            deduplicated = receipt.listed_blobs - receipt.missing_blobs
            metrics.context_blobs.labels(outcome="deduplicated").inc(deduplicated)
            deduplicated_bytes = receipt.listed_bytes - receipt.missing_bytes
            metrics.context_bytes_deduplicated.inc(deduplicated_bytes)
        return build_pb2.UploadContextResponse(
            digest=first.digest, size=first.size, already_present=receipt.already_present,
            missing_blobs=receipt.missing_blobs, missing_bytes=receipt.missing_bytes,
        )  # fmt: skip

    async def MissingBlobs(
        self, request: build_pb2.MissingBlobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[common_pb2.BlobRange]:
        try:
            contexts = self.manager.contexts
            missing = await contexts.missing_blobs(check_digest(request.context_digest))
        except PolyarchError as exc:
            await context.abort(status_code(exc), str(exc))
            return
        for digest, size, offset in missing:
            yield common_pb2.BlobRange(digest=digest, size=size, offset=offset)

    @domain_errors
    async def UploadBlobs(
        self,
        request_iterator: AsyncIterator[build_pb2.UploadBlobsChunk],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> build_pb2.UploadBlobsResponse:
        contexts = self.manager.contexts
        limits = contexts.limits
        metrics = self.manager.metrics
        caller = current_principal().token_id
        async with bounded_upload(contexts.uploads, limits, caller, request_iterator) as messages:
            first = await anext(messages, None)
            if first is None or not first.context_digest:
                raise InvalidRequest(
                    "the first message must name the context (context_digest) the blobs belong to"
                )
            digest = first.context_digest
            listing = await contexts.upload_target(digest)

            async def pieces() -> AsyncGenerator[BlobPiece, None]:
                message: build_pb2.UploadBlobsChunk | None = first
                while message is not None:
                    if message.context_digest not in ("", digest):
                        raise InvalidRequest("all the blobs of one stream go to one context")
                    if message.HasField("blob"):
                        blob = message.blob
                        metrics.context_bytes_received.inc(len(blob.data))
                        yield BlobPiece(blob.digest, blob.size, blob.offset, blob.data)
                    message = await anext(messages, None)

            async with contextlib.aclosing(pieces()) as stream:
                report = await BlobReceiver(contexts, digest, listing.blobs).receive(stream)
        metrics.context_blobs.labels(outcome="uploaded").inc(report.stored_blobs)
        metrics.context_blobs.labels(outcome="discarded").inc(report.discarded_blobs)
        return build_pb2.UploadBlobsResponse(
            stored_blobs=report.stored_blobs, stored_bytes=report.stored_bytes,
            missing_blobs=report.missing_blobs, missing_bytes=report.missing_bytes,
        )  # fmt: skip

    @domain_errors
    async def SubmitBuild(
        self, request: build_pb2.SubmitBuildRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> build_pb2.SubmitBuildResponse:
        spec = convert.spec_from(request)
        owner = current_principal().token_id
        credentials = check_build_credentials(
            [(a.registry, a.username, a.password) for a in request.registry_auths],
            [(secret.id, secret.value) for secret in request.secrets],
            request.sign_key,
        )
        manager = self.manager
        build, existing = await manager.submit(spec, request.idempotency_key, owner, credentials)
        _, jobs = await manager.get(build.id)
        return build_pb2.SubmitBuildResponse(
            build=convert.build_message(build, jobs), existing=existing
        )

    async def WatchBuild(
        self, request: build_pb2.WatchBuildRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[build_pb2.BuildEvent]:
        try:
            async for event in self.manager.watch(request.build_id, request.log_tail):
                yield convert.event_message(event)
        except PolyarchError as exc:
            await context.abort(status_code(exc), str(exc))

    @domain_errors
    async def GetBuild(
        self, request: build_pb2.GetBuildRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> build_pb2.Build:
        return convert.build_message(*await self.manager.get(request.build_id))

    @domain_errors
    async def CancelBuild(
        self, request: build_pb2.CancelBuildRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> build_pb2.Build:
        caller = current_principal()
        await self.manager.check_owner(request.build_id, caller.token_id, caller.role is Role.ADMIN)
        await self.manager.cancel(request.build_id, request.reason or "cancelled by request")
        return convert.build_message(*await self.manager.get(request.build_id))

    @domain_errors
    async def ListBuilds(
        self, request: build_pb2.ListBuildsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> build_pb2.ListBuildsResponse:
        manager = self.manager
        return await list_page(manager.list_page, request, manager.limits)

    async def ExportBuild(
        self, request: build_pb2.ExportBuildRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[build_pb2.ExportChunk]:
        try:
            caller = current_principal()
            manager = self.manager
            await manager.check_owner(request.build_id, caller.token_id, caller.role is Role.ADMIN)
            build, jobs = await manager.get(request.build_id)
            own = check_build_credentials(
                [(a.registry, a.username, a.password) for a in request.registry_auths], []
            )
            stream = self.exporter.export(
                build, jobs, convert.export_format_from(request.format), list(request.platforms),
                client_for(self.exporter.client, own),
            )  # fmt: skip
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    yield build_pb2.ExportChunk(data=chunk)
        except PolyarchError as exc:
            await context.abort(status_code(exc), str(exc))
        except RegistryError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"reading the images: {exc}")

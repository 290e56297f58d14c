"""AgentService: the long-lived agent channel and context downloads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from polyarch.coordinator.core.fleet import AgentSession
from polyarch.coordinator.core.manager import BuildManager
from polyarch.coordinator.core.model import PolyarchError
from polyarch.coordinator.trust.auth import current_principal
from polyarch.coordinator.wire import convert
from polyarch.coordinator.wire.errors import status_code
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger(__name__)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, manager: BuildManager) -> None:
        self.manager = manager

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello")
            return
        certified = current_principal().agent_name
        if certified and first.hello.name != certified:
            # the certificate is the identity; a hello cannot claim another agent's name
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this certificate is agent {certified}'s; hello names {first.hello.name!r}",
            )
            return
        try:
            session = self.manager.attach_agent(convert.hello_from(first.hello), context.peer())
        except PolyarchError as exc:
            await context.abort(status_code(exc), str(exc))
            return
        reader = asyncio.create_task(self._read(session, request_iterator))
        # the reader's end wakes the writer through the outbox: one await per message, no
        # asyncio.wait and no extra future per message (this loop carries every assignment)
        reader.add_done_callback(lambda _: session.outbox.put_nowait(None))
        reason = "closed its stream"
        try:
            while (command := await session.outbox.get()) is not None:
                yield convert.command_message(command)
            if not reader.done():
                reason = "was disconnected by the coordinator"
            elif not reader.cancelled() and reader.exception() is not None:
                reason = f"stream failed: {reader.exception()}"
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.manager.detach_agent(session, reason)

    async def _read(
        self, session: AgentSession, messages: AsyncIterator[agent_pb2.AgentMessage]
    ) -> None:
        manager, name = self.manager, session.name
        async for message in messages:
            manager.roster.heartbeat(session)
            kind = message.WhichOneof("message")
            if kind == "started":
                m = message.started
                manager.job_started(name, m.job_id, m.attempt)
            elif kind == "log":
                m2 = message.log
                manager.job_log(name, m2.job_id, m2.attempt, list(m2.lines))
            elif kind == "result":
                m3 = message.result
                manager.job_result(name, m3.job_id, m3.attempt, convert.outcome_from(m3))
            elif kind == "draining":
                log.info("agent %s is draining: %s", session.name, message.draining.reason)
                manager.set_draining(session.name, True, remember=False)
            elif kind == "heartbeat":
                pass  # liveness is recorded for every message above
            else:
                log.warning("agent %s sent an unexpected %s message", session.name, kind)

    async def FetchContext(
        self, request: agent_pb2.FetchContextRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[common_pb2.ContextChunk]:
        contexts = self.manager.contexts
        if not await self._may_fetch(request.digest, context):
            return
        try:
            kind = contexts.kind_of(request.digest)
            size = contexts.size_of(request.digest)
            if size is None or kind is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"context {request.digest} is not stored"
                )
                return
            kind_code = (
                common_pb2.CONTEXT_KIND_MANIFEST
                if kind == "manifest"
                else common_pb2.CONTEXT_KIND_TAR
            )
            first = True
            async for data in contexts.read(request.digest):
                self.manager.metrics.context_bytes_served.inc(len(data))
                if first:
                    yield common_pb2.ContextChunk(
                        digest=request.digest, size=size, data=data, kind=kind_code
                    )
                    first = False
                else:
                    yield common_pb2.ContextChunk(data=data)
            if first:  # an empty context still announces itself
                yield common_pb2.ContextChunk(digest=request.digest, size=0, kind=kind_code)
        except PolyarchError as exc:
            await context.abort(status_code(exc), str(exc))

    async def FetchBlobs(
        self, request: agent_pb2.FetchBlobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[common_pb2.BlobChunk]:
        contexts = self.manager.contexts
        if not await self._may_fetch(request.context_digest, context):
            return
        try:
            wanted = [(blob.digest, blob.size, blob.offset) for blob in request.blobs]
            ranges = await contexts.fetch_ranges(request.context_digest, wanted)
            async for piece in contexts.blobs.read(ranges):
                self.manager.metrics.context_bytes_served.inc(len(piece.data))
                yield common_pb2.BlobChunk(
                    digest=piece.digest, size=piece.size, offset=piece.offset, data=piece.data
                )
        except PolyarchError as exc:
            await context.abort(status_code(exc), str(exc))

    async def _may_fetch(self, digest: str, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """Only an agent with a current assignment using the context may read it (any caller
        when auth is off: --insecure has no agent identities)."""
        agent = current_principal().agent_name
        if agent and not self.manager.roster.may_fetch_context(agent, digest):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent {agent} holds no current assignment that uses this context",
            )
            return False
        return True

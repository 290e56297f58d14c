"""The standby's gate: every RPC but the health service is refused, naming the active one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from polyarch.proto.active_coordinator import ACTIVE_METADATA
from polyarch.proto.v1 import agent_pb2

_AGENT_SERVICE = f"/{agent_pb2.DESCRIPTOR.services_by_name['AgentService'].full_name}/"
# Open in every mode: a supervisor or load balancer must see a standby alive (it reports
# the polyarch services NOT_SERVING there; see health_statuses).
_ALWAYS_OPEN = "/grpc.health.v1.Health/"

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the stubs
    _Interceptor = grpc.aio.ServerInterceptor


class ActiveGate(_Interceptor):
    """Lets RPCs through only while `active`. Installed before the authentication
    interceptor, so a standby refuses without checking tokens: it serves nothing, and a
    client learns where to go before it needs its credentials there.

    `holder` and `agent_holder` are the active coordinator's client and agent addresses as
    the database records them ("" while no term exists: the refusal then carries no
    polyarch-active)."""

    def __init__(self) -> None:
        self.active = False
        self.holder = self.agent_holder = ""
        self.why_closed = "this coordinator is a standby"

    def open(self) -> None:
        self.active = True

    def close(self, why: str) -> None:
        """Refuses new RPCs from now on (a demotion: the process is about to exit)."""
        self.active, self.holder, self.agent_holder, self.why_closed = False, "", "", why

    def refusal(self, method: str = "") -> tuple[str, tuple[tuple[str, str], ...]]:
        """The details and trailing metadata of a refusal of `method` now: the key names
        where that call goes (an agent's stream: the active's agent port)."""
        target = self.agent_holder if method.startswith(_AGENT_SERVICE) else self.holder
        if not target:
            return f"{self.why_closed}; no coordinator is active yet, retry shortly", ()
        return f"{self.why_closed}; the active one is {target}", ((ACTIVE_METADATA, target),)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or self.active or handler_call_details.method.startswith(_ALWAYS_OPEN):
            return handler
        method = handler_call_details.method
        refused: grpc.RpcMethodHandler[Any, Any] = _refusing(handler, self, method)
        return refused


def _refusing(handler: Any, gate: ActiveGate, method: str) -> Any:
    """A handler of the same kind as `handler` that aborts with UNAVAILABLE before reading
    anything (`handler` is a grpc.RpcMethodHandler; the stubs type its behaviours as sync,
    grpc.aio's are async, hence Any)."""

    async def refuse(context: Any) -> None:
        details, trailing = gate.refusal(method)
        await context.abort(grpc.StatusCode.UNAVAILABLE, details, trailing_metadata=trailing)

    async def unary(_request: Any, context: Any) -> Any:
        await refuse(context)

    async def stream(_request: Any, context: Any) -> AsyncIterator[Any]:
        await refuse(context)
        yield  # never reached: makes this an async generator, as streaming handlers are

    de, se = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, de, se)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, de, se)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, de, se)
    return grpc.stream_stream_rpc_method_handler(stream, de, se)

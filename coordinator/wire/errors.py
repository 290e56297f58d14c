"""Maps domain errors to gRPC status codes for every servicer."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import grpc

from polyarch.coordinator.core.model import (
    AlreadyExists,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    NotReady,
    PermissionDenied,
    PolyarchError,
    Unauthenticated,
    Unschedulable,
)
from polyarch.coordinator.exports.images import ExportError

_CODES: list[tuple[type[PolyarchError], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unschedulable, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReady, grpc.StatusCode.FAILED_PRECONDITION),
    (ExportError, grpc.StatusCode.FAILED_PRECONDITION),
]

P = ParamSpec("P")
R = TypeVar("R")


def status_code(exc: PolyarchError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def domain_errors(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Aborts the RPC with the status code of a domain error and its message as details."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except PolyarchError as exc:
            context: Any = args[-1]
            await context.abort(status_code(exc), str(exc))
            raise AssertionError("unreachable: abort raises") from exc

    return wrapper

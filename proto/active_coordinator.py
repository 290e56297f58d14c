"""How a standby coordinator names the active one, for every side: its refusals' metadata."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

# A standby refuses calls with UNAVAILABLE and this trailing metadata: the active
# coordinator's HOST:PORT to send that call to (its agent port for the agents' service,
# its API port for every other one).
ACTIVE_METADATA = "polyarch-active"
# Standbys followed in a row without an answer; then the ordinary pause (two standbys naming
# each other, or a term naming a coordinator that just died, must not spin).
MAX_REDIRECTS = 5


def active_named(trailing: Iterable[Any] | None) -> str:
    """The active coordinator a standby's refusal names (its trailing metadata), or ""."""
    for key, value in trailing or ():
        if key == ACTIVE_METADATA:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def standby_named(error: grpc.aio.AioRpcError) -> str:
    """For a call a standby refused (UNAVAILABLE): the active coordinator it names, or ""."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return ""
    return active_named(error.trailing_metadata())

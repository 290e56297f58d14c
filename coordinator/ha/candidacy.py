"""A coordinator's part in the election: standby until it wins, active until it may have lost.

Demotion never happens in place: once leadership may be lost (the lock's session failed or
went silent, or a commit was fenced) the gate closes and the process exits with
EXIT_DEMOTED, and its supervisor starts it again as a standby. Unwinding the dispatcher,
the agents' streams and the in-memory ledger back to a clean standby would be a second,
rarely run path; a fresh start is the path every restart already tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from polyarch.coordinator.ha.election import Election, Term
from polyarch.coordinator.ha.gate import ActiveGate

log = logging.getLogger(__name__)

# `polyarch coordinator`'s exit code after a demotion: restart me (as a standby).
EXIT_DEMOTED = 4


def dialled_address(listen: str, advertise: list[str], port: int) -> str:
    """What a client (or agent) dials for a listener bound to `port`: the first --advertise
    name with that port, else the listen host (bracketed if IPv6) with it."""
    host = advertise[0] if advertise else listen.rpartition(":")[0]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class Candidacy:
    """Drives one coordinator through the election. `promote(term)` loads the state and
    starts dispatching (term None: no election, the coordinator is alone on its state);
    `announce(active)` updates health and metrics. `lost` is set once this coordinator must
    stop, `reason` says why."""

    def __init__(
        self,
        election: Election | None,
        gate: ActiveGate,
        promote: Callable[[Term | None], Awaitable[None]],
        announce: Callable[[bool], Coroutine[Any, Any, None]],
    ) -> None:
        self.election, self.gate = election, gate
        self._promote, self._announce = promote, announce
        self.lost = asyncio.Event()
        self.reason = ""
        self.term: Term | None = None
        self._task: asyncio.Task[None] | None = None
        self._announcing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Tries once at once, so a lone coordinator is active when this returns; otherwise
        stands by (the gate closed) and campaigns in the background."""
        if self.election is None:
            await self._become_active(None)
            return
        term = await self.election.attempt()
        if term is not None:
            await self._become_active(term)
            self._task = asyncio.create_task(self._hold(), name="ha-hold")
            return
        await self._announce(False)
        self._task = asyncio.create_task(self._stand_by(), name="ha-standby")

    def demote(self, reason: str) -> None:
        """Stops serving at once (new RPCs refused) and sets `lost`; idempotent. Sync, so a
        store's fenced commit can call it from its writer."""
        if self.lost.is_set():
            return
        self.reason = reason
        self.gate.close(f"this coordinator stepped down ({reason})")
        log.error("high availability: no longer the active coordinator: %s", reason)
        self._announcing = asyncio.create_task(self._announce(False), name="ha-announce")
        self.lost.set()

    async def close(self) -> None:
        """Ends the campaign or the term and lets the lock go (a graceful stop: a standby
        takes over without waiting for the session to time out)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.election is not None:
            await self.election.resign()

    async def _become_active(self, term: Term | None) -> None:
        self.term = term
        await self._promote(term)  # the store is fenced to the term before it writes
        self.gate.open()
        await self._announce(True)
        if term is not None:
            log.info(
                "high availability: active for term %d as %s (agents: %s), took %.1f s "
                "after winning",
                term.epoch, term.holder, term.agent_holder or "-", time.time() - term.since,
            )  # fmt: skip

    async def _stand_by(self) -> None:
        assert self.election is not None
        announced = None
        # each lost attempt reads the current term on the same session: the gate's answer
        # (the active's address) stays current without a connection of its own
        while (term := await self.election.attempt()) is None:
            seen = self.election.seen
            self.gate.holder = seen.holder if seen is not None else ""
            self.gate.agent_holder = seen.agent_holder if seen is not None else ""
            if self.gate.holder != announced:
                announced = self.gate.holder
                log.info(
                    "high availability: standby; the active coordinator is %s",
                    announced or "not elected yet",
                )
            await asyncio.sleep(self.election.retry)
        self.gate.holder = self.gate.agent_holder = ""
        try:
            await self._become_active(term)
        except Exception as error:  # the database, the state: a restart starts clean
            log.exception("high availability: promotion failed")
            self.demote(f"the promotion failed: {error}")
            return
        await self._hold()

    async def _hold(self) -> None:
        assert self.election is not None
        self.demote(await self.election.hold())

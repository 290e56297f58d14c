"""One active coordinator at a time, elected through PostgreSQL: a session lock and a fenced term.

The active coordinator holds a session-level advisory lock on a connection of its own that
does nothing else, so the lock lives exactly as long as that session: a coordinator killed
or cut off loses it once the server sees the session gone (a closed socket at once; a
silent peer after the TCP keepalive and user timeouts set below). Each win bumps the term's
epoch; the state store checks the epoch in every commit (PostgresStore.fence_epoch), so a
coordinator that lost the lock can write nothing, whatever it still believes.

The active also steps down by itself: `hold()` returns once the lock's session has not
answered for `lease` seconds. The server gives up on a silent session only after
`SERVER_SILENCE` seconds, longer than any lease allowed here, so a partitioned active stops
dispatching before a standby can win.

A frozen or hung active (SIGSTOP, a stalled VM) is the one case the server never notices:
its kernel still answers keepalives. Its renewals stop, though, so a standby that sees none
for `HUNG_AFTER` seconds (more than any live active goes without one: it renews every lease/4
and steps down after `lease`) ends the holder's session itself and wins the lock. Should the
hung one wake, its first commit is fenced and its hold() fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection

from polyarch.coordinator.core.postgres_schema import LEADER_LOCK, migrate
from polyarch.coordinator.database_address import redacted_dsn

log = logging.getLogger(__name__)

# When the server drops a silent session (idle + count * interval keepalive probes; the user
# timeout for data it sent that was never acknowledged): the lock is free from then on.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 2, 2, 3
SERVER_SILENCE = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT  # 8 s
MAX_LEASE = SERVER_SILENCE - 2.0  # what a lease may be: the active is gone 2 s earlier
HUNG_AFTER = SERVER_SILENCE + MAX_LEASE  # no renewal for this long: the active is hung
# The leader lock as pg_locks shows a bigint advisory key: its high and low 32 bits.
_LOCK_ROW = (LEADER_LOCK >> 32, LEADER_LOCK & 0xFFFF_FFFF)
_SESSION = (
    f"-c tcp_keepalives_idle={KEEPALIVE_IDLE} -c tcp_keepalives_interval={KEEPALIVE_INTERVAL}"
    f" -c tcp_keepalives_count={KEEPALIVE_COUNT} -c tcp_user_timeout={SERVER_SILENCE * 1000}"
    " -c idle_session_timeout=0 -c statement_timeout=0"
)


@dataclass(frozen=True)
class Term:
    """A coordinator's time as the active one: its epoch (the fencing token) and address."""

    epoch: int
    holder: str
    since: float
    agent_holder: str = ""  # the active's agent (mTLS) address


class Election:
    """This coordinator's candidacy: `campaign()` until it wins, then `hold()` while it is
    active; `resign()` lets go. `me` is the address clients should be sent to, `agents` the
    one agents should (recorded as the term's agent_holder)."""

    def __init__(
        self, dsn: str, me: str, *, agents: str = "", lease: float = 4.0, retry: float = 1.0
    ) -> None:
        if not 0 < lease <= MAX_LEASE:
            raise ValueError(
                f"the leadership lease must be within (0, {MAX_LEASE:g}] seconds: the server "
                f"frees a silent session's lock after {SERVER_SILENCE} s, and the active must "
                "have stepped down before"
            )
        self.dsn, self.me, self.lease, self.retry = dsn, me, lease, retry
        self.hung_after = HUNG_AFTER
        self.agents = agents
        self._where = f"the PostgreSQL database {redacted_dsn(dsn)}"
        self._conn: AsyncConnection[Any] | None = None
        self._answered = 0.0  # monotonic time the lock's session last answered
        self.term: Term | None = None
        # The term another coordinator holds, as the last lost attempt read it (for a
        # standby's redirects): read on the campaign's own session, not a new connection.
        self.seen: Term | None = None

    async def campaign(self) -> Term:
        """Waits until this coordinator holds the lock, then starts a new term and returns
        it. A database that is down or refuses is retried every `retry` seconds."""
        while True:
            term = await self.attempt()
            if term is not None:
                return term
            await asyncio.sleep(self.retry)

    async def attempt(self) -> Term | None:
        """One try at the lock: the new term if this coordinator won it, None if another
        holds it or the database did not answer (logged)."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await self._connect()
            cursor = await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
            row = await cursor.fetchone()
            if row is not None and row[0]:
                self.term = await self._new_term(self._conn)
                self._answered = time.monotonic()
                log.info("election: active for term %d (%s)", self.term.epoch, self.me)
                return self.term
            self.seen, silent = await _read_term(self._conn)
            if silent >= self.hung_after:
                await self._end_hung_term(self._conn, silent)
        except psycopg.Error as error:
            log.warning("election: %s did not answer (%s); retrying", self._where, error)
            await self._drop()
        return None

    async def hold(self) -> str:
        """Returns why this coordinator must stop acting as the active one: the lock's
        session failed, or did not answer for `lease` seconds. Checks it every lease/4.

        A check is never cancelled while it waits (psycopg would try to cancel the query
        over a new connection and hold the session meanwhile): past the deadline the session
        is dropped with the check still in flight."""
        conn = self._conn
        if conn is None or self.term is None:
            raise RuntimeError("hold() before campaign() won")
        check: asyncio.Task[Any] | None = None
        while True:
            left = self._answered + self.lease - time.monotonic()
            if left <= 0:
                reason = f"{self._where} did not answer for {self.lease:g} s"
                break
            if check is None:
                check = asyncio.create_task(conn.execute(_RENEW, (self.term.epoch,)))
            done, _ = await asyncio.wait({check}, timeout=min(self.lease / 4, left))
            if not done:
                continue  # still waiting: the deadline decides
            error = check.exception()
            check = None
            if error is not None:
                reason = f"the session holding the leadership failed: {error}"
                break
            self._answered = time.monotonic()
            await asyncio.sleep(self.lease / 4)
        log.warning("election: term %d over: %s", self.term.epoch, reason)
        await self._drop()  # whatever the server thinks, this session is done with
        if check is not None:
            check.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(check, 1.0)
        return reason

    async def active(self) -> Term | None:
        """The current term as the database records it (on this candidacy's session, or a
        connection of its own when there is none)."""
        if self._conn is not None and not self._conn.closed:
            return (await _read_term(self._conn))[0]
        async with await AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            return (await _read_term(conn))[0]

    async def resign(self) -> None:
        """Lets the lock go at once (closing the session frees it); idempotent."""
        await self._drop()

    async def _connect(self) -> AsyncConnection[Any]:
        conn = await AsyncConnection.connect(
            self.dsn, autocommit=True, application_name="polyarch-election", options=_SESSION,
            keepalives=1, keepalives_idle=KEEPALIVE_IDLE,
            keepalives_interval=KEEPALIVE_INTERVAL, keepalives_count=KEEPALIVE_COUNT,
        )  # fmt: skip
        try:
            await migrate(conn, self._where)  # the term table is a migration like the others
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _new_term(self, conn: AsyncConnection[Any]) -> Term:
        # waits for commits of the previous term that hold its row FOR SHARE (the fence)
        cursor = await conn.execute(
            "UPDATE coordinator_term SET epoch = epoch + 1, holder = %s, since = %s, "
            "agent_holder = %s WHERE id = 1 RETURNING epoch, holder, since, agent_holder",
            (self.me, time.time(), self.agents),
        )
        row = await cursor.fetchone()
        assert row is not None  # the migration inserts the one row
        await conn.execute(_RENEW, (row[0],))
        return Term(int(row[0]), str(row[1]), float(row[2]), str(row[3]))

    async def _end_hung_term(self, conn: AsyncConnection[Any], silent: float) -> None:
        """Ends the lock holder's session: the active has not renewed its term for `silent`
        seconds (server time), more than `hung_after`: it is frozen or hung, not gone."""
        ended = await conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted AND classid::bigint = %s "
            "AND objid::bigint = %s AND objsubid = 1",
            _LOCK_ROW,
        )
        count = await ended.fetchone()
        log.warning(
            "election: the active coordinator (%s) has not renewed its term for %.0f s: "
            "hung or frozen; ended %d session(s) holding the leadership",
            self.seen.holder if self.seen else "unknown", silent, count[0] if count else 0,
        )  # fmt: skip

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            try:
                async with asyncio.timeout(1.0):
                    await conn.close()
            except (TimeoutError, psycopg.Error):
                pass  # a hung socket: the server frees the session after SERVER_SILENCE


# A renewal is also the check that the lock's session answers.
_RENEW = "UPDATE coordinator_renewal SET epoch = %s, renewed_at = now() WHERE id = 1"


async def _read_term(conn: AsyncConnection[Any]) -> tuple[Term | None, float]:
    """The current term (None before the first) and the seconds since its holder last
    renewed it, by the server's clock; one round trip."""
    cursor = await conn.execute(
        "SELECT t.epoch, t.holder, t.since, t.agent_holder, "
        "extract(epoch FROM now() - r.renewed_at) "
        "FROM coordinator_term t CROSS JOIN coordinator_renewal r WHERE t.id = 1"
    )
    row = await cursor.fetchone()
    if row is None or not row[1]:
        return None, 0.0
    return Term(int(row[0]), str(row[1]), float(row[2]), str(row[3])), float(row[4])

"""The agent's outbox: messages for the coordinator that outlive a stream, sent once welcomed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from polyarch.proto.v1 import agent_pb2

_T = TypeVar("_T")


class Stream:
    """One stream's part in the outbox: whether the coordinator welcomed it, whether it
    ended, and the message gRPC took from the outbox but may not have written."""

    def __init__(self) -> None:
        self.welcomed = asyncio.Event()
        self.ended = asyncio.Event()
        self.in_flight: agent_pb2.AgentMessage | None = None

    async def until(self, awaitable: Awaitable[_T]) -> _T | None:
        """`awaitable`'s result, or None (and it cancelled) if the stream ended first."""
        task = asyncio.ensure_future(awaitable)
        ended = asyncio.ensure_future(self.ended.wait())
        await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if task.done():
            return task.result()
        task.cancel()
        return None


class Outbox(asyncio.Queue[agent_pb2.AgentMessage]):
    """Results, logs and heartbeats, kept across reconnects: what is produced while no
    stream is up goes out on the next one, and only to a coordinator that welcomed it (a
    standby's refusal or a dead address consumes nothing).

    Why not a plain generator over the queue: gRPC's task that drains a request iterator
    outlives a call the server ended, and would take the next message for a dead stream."""

    async def requests(
        self, hello: agent_pb2.AgentMessage, stream: Stream
    ) -> AsyncIterator[agent_pb2.AgentMessage]:
        """The request iterator of one stream: `hello`, then (once welcomed) the outbox
        until the stream ends."""
        yield hello
        if await stream.until(stream.welcomed.wait()) is None:
            return
        while (message := await stream.until(self.get())) is not None:
            if stream.ended.is_set():  # taken just as the stream ended: for the next one
                self.put_nowait(message)
                return
            stream.in_flight = message
            yield message
            stream.in_flight = None  # written: gRPC asks for the next only then

    def ended(self, stream: Stream) -> None:
        """The stream is over: its iterator stops taking messages, and one it took but may
        not have written goes back (a duplicate at worst, which the coordinator ignores)."""
        stream.ended.set()
        if stream.in_flight is not None:
            self.put_nowait(stream.in_flight)
            stream.in_flight = None

"""The agent's outbox: nothing is lost to a stream that was refused, or ended mid-send."""

from __future__ import annotations

import asyncio

from polyarch.agent.outbox import Outbox, Stream
from polyarch.proto.v1 import agent_pb2

HELLO = agent_pb2.AgentMessage(hello=agent_pb2.AgentHello(name="a1"))


def result(job_id: str) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(result=agent_pb2.JobResult(job_id=job_id, ok=True))


async def test_a_stream_never_welcomed_takes_nothing_but_its_hello() -> None:
    outbox = Outbox()
    outbox.put_nowait(result("j1"))
    refused = Stream()
    requests = outbox.requests(HELLO, refused)
    assert await anext(requests) == HELLO
    pending = asyncio.ensure_future(anext(requests))  # as gRPC's writer asks for more
    done, _ = await asyncio.wait({pending}, timeout=0.1)  # it must wait for the Welcome
    assert not done and outbox.qsize() == 1
    outbox.ended(refused)  # a standby's refusal, say
    assert await _rest(pending) == [] and outbox.qsize() == 1


async def test_a_message_taken_but_maybe_unwritten_goes_to_the_next_stream() -> None:
    outbox = Outbox()
    for job in ("j1", "j2"):
        outbox.put_nowait(result(job))
    first = Stream()
    requests = outbox.requests(HELLO, first)
    await anext(requests)
    first.welcomed.set()
    assert (await anext(requests)).result.job_id == "j1"  # handed to gRPC, not yet written
    outbox.ended(first)  # the stream died under it

    second = Stream()
    again = outbox.requests(HELLO, second)
    await anext(again)
    second.welcomed.set()
    sent = {(await anext(again)).result.job_id for _ in range(2)}
    assert sent == {"j1", "j2"} and outbox.empty()
    await again.aclose()


async def _rest(pending: asyncio.Future[agent_pb2.AgentMessage]) -> list[agent_pb2.AgentMessage]:
    try:
        return [await pending]
    except StopAsyncIteration:
        return []

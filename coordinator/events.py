"""Fan-out of build events to watchers, with a bounded log tail per job for late joiners."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from polyarch.proto.v1 import build_pb2

LOG_TAIL_LINES = 200
# A watcher that falls this far behind is cut off rather than growing memory without bound.
WATCHER_QUEUE_LIMIT = 10_000


class EventHub:
    """Publishes BuildEvents per build id to any number of subscriber queues."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[build_pb2.BuildEvent | None]]] = {}
        self._tails: dict[str, deque[build_pb2.LogLine]] = {}

    def subscribe(self, build_id: str) -> asyncio.Queue[build_pb2.BuildEvent | None]:
        queue: asyncio.Queue[build_pb2.BuildEvent | None] = asyncio.Queue(WATCHER_QUEUE_LIMIT)
        self._subscribers.setdefault(build_id, set()).add(queue)
        return queue

    def unsubscribe(self, build_id: str, queue: asyncio.Queue[build_pb2.BuildEvent | None]) -> None:
        subscribers = self._subscribers.get(build_id)
        if subscribers is not None:
            subscribers.discard(queue)
            if not subscribers:
                del self._subscribers[build_id]

    def publish(self, build_id: str, event: build_pb2.BuildEvent) -> None:
        if event.HasField("log"):
            tail = self._tails.setdefault(event.log.job_id, deque(maxlen=LOG_TAIL_LINES))
            tail.append(event.log)
        for queue in list(self._subscribers.get(build_id, ())):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # a watcher this far behind is ended; it can watch again for a fresh snapshot
                self.unsubscribe(build_id, queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    def finish(self, build_id: str) -> None:
        """Tells every watcher of the build that nothing more will come."""
        for queue in list(self._subscribers.get(build_id, ())):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    def log_tail(self, job_id: str, lines: int) -> list[build_pb2.LogLine]:
        tail = self._tails.get(job_id)
        return list(tail)[-lines:] if tail and lines > 0 else []

    def forget_job(self, job_id: str) -> None:
        self._tails.pop(job_id, None)

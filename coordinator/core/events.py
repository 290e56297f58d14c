"""Fan-out of build events to watchers, with per-job log tails and watcher backlogs in bytes."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from polyarch.coordinator.core.model import BuildRecord, JobRecord
from polyarch.coordinator.limits import KIB, Limits, clip_utf8

# One log line is kept and sent up to this size; the rest is replaced by a marker.
MAX_LINE_BYTES = 16 * KIB
# Charged per kept line on top of its text: a million empty lines still cost a million objects.
LINE_OVERHEAD_BYTES = 256
# A watcher this many events behind is cut off even if they are small (each is an object).
WATCHER_QUEUE_LIMIT = 10_000


@dataclass(frozen=True)
class LogLine:
    """One line of a job's build output."""

    job_id: str
    platform: str
    attempt: int
    line: str


@dataclass(frozen=True)
class JobChanged:
    """A job's new state and details (a copy made when it changed)."""

    job: JobRecord


@dataclass(frozen=True)
class BuildChanged:
    """A build's new state with its jobs (copies made when it changed)."""

    build: BuildRecord
    jobs: tuple[JobRecord, ...]


BuildEvent = LogLine | JobChanged | BuildChanged


def event_size(event: BuildEvent) -> int:
    """About what the event costs a watcher's backlog, in bytes (its text plus a fixed
    charge per record): the bound is on memory, so an estimate of the encoded size will do."""
    if isinstance(event, LogLine):
        return len(event.line.encode()) + len(event.job_id) + 32
    jobs = (event.job,) if isinstance(event, JobChanged) else event.jobs
    size = sum(_job_size(j) for j in jobs)
    if isinstance(event, BuildChanged):
        build = event.build
        size += 256 + len(build.error) + sum(len(t) for t in build.spec.tags)
    return size


def _job_size(job: JobRecord) -> int:
    return 256 + len(job.error) + len(job.failed_step) + sum(len(r) for r in job.requeue_reasons)


def clip_line(line: str) -> str:
    """The line, or its first MAX_LINE_BYTES with a marker saying how much was cut."""
    kept, cut = clip_utf8(line, MAX_LINE_BYTES)
    return f"{kept} [polyarch: line truncated, {cut} more bytes]" if cut else line


@dataclass
class _Tail:
    """The newest lines of one job's log, at most `budget` bytes of them."""

    lines: deque[LogLine] = field(default_factory=deque)
    bytes: int = 0
    dropped: int = 0  # bytes of text dropped from the front


class Watcher:
    """One watcher's undelivered events and their size: the queue a watch reads from."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[BuildEvent, int] | None] = asyncio.Queue()
        self.backlog_bytes = 0
        # why the hub ended this watch early ("" unless it was cut off)
        self.cut_off = ""

    async def get(self) -> BuildEvent | None:
        """The next event; None once the build ended or the watcher was cut off."""
        item = await self._queue.get()
        if item is None:
            return None
        event, size = item
        self.backlog_bytes -= size
        return event

    def put(self, event: BuildEvent, size: int) -> None:
        self.backlog_bytes += size
        self._queue.put_nowait((event, size))

    def close(self) -> None:
        """No more events: the watch ends once it has read what is queued."""
        self._queue.put_nowait(None)

    def cut(self, reason: str) -> None:
        """Ends the watch now, dropping what it has not read."""
        self.cut_off = reason
        while not self._queue.empty():  # what it will never read is freed now
            self._queue.get_nowait()
        self.backlog_bytes = 0
        self._queue.put_nowait(None)

    @property
    def pending(self) -> int:
        return self._queue.qsize()


class EventHub:
    """Publishes build events (domain records; the servicer encodes them) per build id to any
    number of watchers."""

    def __init__(self, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        self.max_log_bytes = limits.max_log_bytes_per_job
        self.max_backlog_bytes = limits.max_watcher_backlog_bytes
        self._subscribers: dict[str, set[Watcher]] = {}
        self._tails: dict[str, _Tail] = {}

    def subscribe(self, build_id: str) -> Watcher:
        watcher = Watcher()
        self._subscribers.setdefault(build_id, set()).add(watcher)
        return watcher

    def unsubscribe(self, build_id: str, watcher: Watcher) -> None:
        subscribers = self._subscribers.get(build_id)
        if subscribers is not None:
            subscribers.discard(watcher)
            if not subscribers:
                del self._subscribers[build_id]

    def watched(self, build_id: str) -> bool:
        """Whether anyone watches the build: events nobody reads are not even made."""
        return build_id in self._subscribers

    def publish_log(self, build_id: str, line: LogLine) -> None:
        """Keeps a (clipped) line in its job's tail and sends it to the build's watchers."""
        line = LogLine(line.job_id, line.platform, line.attempt, clip_line(line.line))
        self._keep(line)
        self.publish(build_id, line)

    def publish(self, build_id: str, event: BuildEvent) -> None:
        size = event_size(event)
        for watcher in list(self._subscribers.get(build_id, ())):
            behind = watcher.backlog_bytes + size
            if behind > self.max_backlog_bytes or watcher.pending >= WATCHER_QUEUE_LIMIT:
                # ended rather than buffered without bound; it can watch again for a snapshot
                self.unsubscribe(build_id, watcher)
                watcher.cut(
                    f"this watch fell {behind} bytes ({watcher.pending + 1} events) behind; "
                    f"the limit is {self.max_backlog_bytes} bytes (max_watcher_backlog_bytes) "
                    f"or {WATCHER_QUEUE_LIMIT} events: watch again"
                )
            else:
                watcher.put(event, size)

    def finish(self, build_id: str) -> None:
        """Tells every watcher of the build that nothing more will come."""
        for watcher in list(self._subscribers.get(build_id, ())):
            watcher.close()

    def log_tail(self, job_id: str, lines: int) -> list[LogLine]:
        """The job's last `lines` kept lines, after a marker when older text was dropped."""
        tail = self._tails.get(job_id)
        if tail is None or lines <= 0 or not tail.lines:
            return []
        kept = list(tail.lines)[-lines:]
        if tail.dropped and len(kept) == len(tail.lines):
            first = kept[0]
            marker = LogLine(
                first.job_id, first.platform, first.attempt,
                f"[polyarch: {tail.dropped} bytes of earlier log dropped (max_log_bytes_per_job)]",
            )  # fmt: skip
            kept.insert(0, marker)
        return kept

    def tail_bytes(self, job_id: str) -> int:
        """What the job's kept log costs, as charged against max_log_bytes_per_job."""
        tail = self._tails.get(job_id)
        return tail.bytes if tail is not None else 0

    def forget_job(self, job_id: str) -> None:
        self._tails.pop(job_id, None)

    def _keep(self, line: LogLine) -> None:
        """Appends a line to its job's tail, dropping the oldest beyond the byte budget."""
        tail = self._tails.setdefault(line.job_id, _Tail())
        tail.lines.append(line)
        tail.bytes += len(line.line.encode()) + LINE_OVERHEAD_BYTES
        while tail.bytes > self.max_log_bytes and len(tail.lines) > 1:
            old = tail.lines.popleft()
            text = len(old.line.encode())
            tail.bytes -= text + LINE_OVERHEAD_BYTES
            tail.dropped += text

"""The coordinator's job timeout, with simulated agents and a controlled clock."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from polyarch.coordinator.contexts.store import ContextStore
from polyarch.coordinator.core.fleet import AgentSession
from polyarch.coordinator.core.manager import MAX_ATTEMPTS, AgentEvent, BuildManager
from polyarch.coordinator.core.model import BuildSpec, BuildState, JobState
from polyarch.coordinator.core.store import MemoryStore
from polyarch.coordinator.limits import Limits
from polyarch.coordinator.metrics import CoordinatorMetrics
from polyarch.proto.v1 import agent_pb2

CONTEXT = b"timeouts"
DIGEST = "sha256:" + hashlib.sha256(CONTEXT).hexdigest()
TIMEOUT = 60.0
REASON = "no result after 60 s (coordinator job timeout)"


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def setup(tmp_path: Path) -> tuple[BuildManager, Clock]:
    contexts = ContextStore(tmp_path)
    contexts.path_for(DIGEST).write_bytes(CONTEXT)
    clock = Clock()
    manager = BuildManager(MemoryStore(), contexts, None, CoordinatorMetrics(), clock=clock,  # type: ignore[arg-type]
                           limits=Limits(job_timeout_seconds=TIMEOUT))  # fmt: skip
    return manager, clock


def connect(manager: BuildManager, name: str) -> AgentSession:
    hello = agent_pb2.AgentHello(name=name, builder="sim", native_platforms=["linux/amd64"],
                                 slots=1)  # fmt: skip
    return manager.attach_agent(hello, "sim")


def messages(session: AgentSession, kind: str) -> list[Any]:
    found = []
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message is not None and message.HasField(kind):
            found.append(getattr(message, kind))
    return found


def submit(manager: BuildManager) -> str:
    spec = BuildSpec(DIGEST, "Dockerfile", ["linux/amd64"], ["127.0.0.1:5000/a/b:1"])
    return manager.submit(spec, "")[0].id


def test_an_attempt_without_a_result_is_cancelled_on_its_agent_and_requeued(
    tmp_path: Path,
) -> None:
    manager, clock = setup(tmp_path)
    silent = connect(manager, "silent")
    build_id = submit(manager)
    (assign,) = messages(silent, "assign")
    manager.job_started(AgentEvent("silent", assign.job_id, 1))
    manager.expire_overdue_jobs()
    clock.now += TIMEOUT  # exactly the timeout: not yet over it
    manager.expire_overdue_jobs()
    assert messages(silent, "cancel") == []
    other = connect(manager, "other")  # heartbeats alone never extend an attempt
    manager.heartbeat(silent)
    clock.now += 1
    manager.expire_overdue_jobs()
    (cancel,) = messages(silent, "cancel")
    assert (cancel.job_id, cancel.attempt, cancel.reason) == (assign.job_id, 1, REASON)
    (retry,) = messages(other, "assign")  # re-queued, and placed away from the silent agent
    assert (retry.job_id, retry.attempt) == (assign.job_id, 2)
    _, (job,) = manager.get(build_id)
    assert job.requeue_reasons == [f"{REASON} on silent"]
    assert manager.metrics.registry.get_sample_value(
        "polyarch_job_requeues_total", {"reason": "infrastructure"}) == 1  # fmt: skip
    # the timed-out attempt's result comes late: fenced off, the new attempt carries on
    late = agent_pb2.JobResult(job_id=assign.job_id, attempt=1, ok=False, error="late")
    manager.job_result(AgentEvent("silent", assign.job_id, 1), late)
    assert manager.get(build_id)[1][0].state is JobState.ASSIGNED
    assert manager.get(build_id)[1][0].attempt == 2


def test_an_attempt_that_reports_in_time_is_left_alone(tmp_path: Path) -> None:
    manager, clock = setup(tmp_path)
    agent = connect(manager, "prompt")
    submit(manager)
    (assign,) = messages(agent, "assign")
    manager.expire_overdue_jobs()
    clock.now += TIMEOUT / 2
    manager.job_log(AgentEvent("prompt", assign.job_id, 1), ["still building"])
    manager.expire_overdue_jobs()
    manager.job_result(AgentEvent("prompt", assign.job_id, 1), agent_pb2.JobResult(
        job_id=assign.job_id, attempt=1, ok=False, error="compile error"))  # fmt: skip
    clock.now += 10 * TIMEOUT
    manager.expire_overdue_jobs()
    assert messages(agent, "cancel") == []


def test_timeouts_count_against_max_attempts_and_then_fail_the_build(
    tmp_path: Path,
) -> None:
    manager, clock = setup(tmp_path)
    agent = connect(manager, "slow")
    build_id = submit(manager)
    cancelled = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        sent = [m for m in drain(agent)]
        assert [m.assign.attempt for m in sent if m.HasField("assign")] == [attempt]
        cancelled += [m.cancel.attempt for m in sent if m.HasField("cancel")]
        manager.expire_overdue_jobs()
        clock.now += TIMEOUT + 1
        manager.expire_overdue_jobs()
    cancelled += [m.cancel.attempt for m in drain(agent) if m.HasField("cancel")]
    assert cancelled == list(range(1, MAX_ATTEMPTS + 1))  # each attempt cancelled once
    build, (job,) = manager.get(build_id)
    assert job.state is JobState.FAILED
    assert job.error == f"gave up after {MAX_ATTEMPTS} attempts; last: {REASON} on slow"
    assert build.state is BuildState.FAILED


def drain(session: AgentSession) -> list[agent_pb2.CoordinatorMessage]:
    found = []
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message is not None:
            found.append(message)
    return found

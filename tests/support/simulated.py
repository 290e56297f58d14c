"""Simulated agents for the build manager's unit tests: domain messages in and out, no gRPC."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, TypeVar

from polyarch.coordinator.contexts.store import ContextStore
from polyarch.coordinator.core.completion import Publisher
from polyarch.coordinator.core.fleet import AgentSession, Assign, Cancel, Hello
from polyarch.coordinator.core.manager import BuildManager
from polyarch.coordinator.core.states import JobOutcome
from polyarch.coordinator.core.store import MemoryStore, StateStore
from polyarch.coordinator.limits import Limits
from polyarch.coordinator.metrics import CoordinatorMetrics

CONTEXT = b"not really a tar, the manager never opens it"
DIGEST = "sha256:" + hashlib.sha256(CONTEXT).hexdigest()
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
Command = TypeVar("Command", Assign, Cancel)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def started_manager(
    tmp_path: Path,
    publisher: Publisher | None = None,
    clock: Clock | None = None,
    limits: Limits | None = None,
    store: StateStore | None = None,
    reattach_grace: float = 10.0,
) -> BuildManager:
    """A manager on a memory store with the test context stored, recovered and dispatching."""
    contexts = ContextStore(tmp_path / "contexts")
    contexts.path_for(DIGEST).write_bytes(CONTEXT)
    manager = BuildManager(
        store or MemoryStore(), contexts, publisher, CoordinatorMetrics(),  # type: ignore[arg-type]
        clock=clock or Clock(), limits=limits,
    )  # fmt: skip
    await manager.start(reattach_grace)
    return manager


def connect(
    manager: BuildManager,
    name: str,
    native: list[str],
    emulated: tuple[str, ...] = (),
    slots: int = 2,
    running: tuple[tuple[str, int], ...] = (),
    builder: str = "sim",
) -> AgentSession:
    hello = Hello(
        name=name, builder=builder, native_platforms=tuple(native), emulated_platforms=emulated,
        slots=slots, running=running,
    )  # fmt: skip
    return manager.attach_agent(hello, "sim")


async def received(manager: BuildManager, session: AgentSession, kind: type[Command]) -> list[Any]:
    """The commands of one kind the agent got since the last look (once dispatch settled)."""
    await manager.settle()
    found, others = [], []
    while not session.outbox.empty():
        command = session.outbox.get_nowait()
        if isinstance(command, kind):
            found.append(command)
        elif isinstance(command, Assign | Cancel):
            others.append(command)
    for command in others:  # kept for a later look at another kind
        session.outbox.put_nowait(command)
    return found


async def assignments(manager: BuildManager, session: AgentSession) -> list[Assign]:
    return await received(manager, session, Assign)


def fake_digest(seed: str) -> str:
    """A well-formed digest (the coordinator refuses malformed ones) that names its seed."""
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def pushed(digest: str) -> JobOutcome:
    return JobOutcome(ok=True, digest=digest, size=512, media_type=OCI_MANIFEST)

"""The coordinator process: wiring, lifecycle (idempotent start/stop) and the CLI entry point."""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import start_http_server

from polyarch.coordinator.agent_servicer import AgentServicer
from polyarch.coordinator.assembly import IndexPublisher
from polyarch.coordinator.build_servicer import BuildServicer
from polyarch.coordinator.builds import BuildManager
from polyarch.coordinator.contexts import ContextStore
from polyarch.coordinator.credentials import CredentialStore
from polyarch.coordinator.fleet_servicer import FleetServicer
from polyarch.coordinator.metrics import CoordinatorMetrics
from polyarch.coordinator.registry import RegistryClient
from polyarch.coordinator.store import SQLiteStore
from polyarch.proto.v1 import agent_pb2_grpc, build_pb2_grpc, fleet_pb2_grpc

log = logging.getLogger(__name__)

# Exit codes of `polyarch coordinator`.
EXIT_OK = 0
EXIT_START_FAILED = 1

# Keepalive: notice a silent network (no RST) within about 30 s even between heartbeats.
_SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 << 20),
]


class Status(enum.Enum):
    INIT = "init"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class CoordinatorConfig:
    listen: str = "127.0.0.1:7600"
    data_dir: Path = Path("polyarch-data")
    metrics_listen: str = ""
    insecure_registries: list[str] = field(default_factory=list)
    docker_config: Path | None = None
    # An agent silent for this long loses its jobs to the queue (agents heartbeat every 3 s).
    agent_timeout: float = 10.0
    registry_timeout: float = 30.0


class Coordinator:
    """gRPC server + build manager + metrics endpoint, started and stopped as one."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.status = Status.INIT
        self.port = 0
        self.metrics_port = 0
        self.metrics = CoordinatorMetrics()
        self.finished = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._store: SQLiteStore | None = None
        self._registry: RegistryClient | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.manager: BuildManager | None = None

    async def start(self, timeout: float = 30.0) -> None:
        """Starts everything; idempotent; on failure closes what it opened and raises."""
        if self.status is not Status.INIT:
            return
        self.status = Status.STARTING
        try:
            await asyncio.wait_for(self._start(), timeout)
        except BaseException:
            await self.stop(grace=0)
            raise
        self.status = Status.RUNNING

    async def _start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self._store = SQLiteStore(cfg.data_dir / "state.sqlite3")
        self._registry = RegistryClient(
            credentials=CredentialStore.from_docker_config(cfg.docker_config),
            insecure_registries=cfg.insecure_registries,
            timeout=cfg.registry_timeout,
            on_request_error=lambda kind: self.metrics.registry_errors.labels(kind=kind).inc(),
        )
        self.manager = BuildManager(
            self._store, ContextStore(cfg.data_dir / "contexts"),
            IndexPublisher(self._registry), self.metrics,
        )  # fmt: skip
        self.manager.recover(reattach_grace=cfg.agent_timeout)
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        build_pb2_grpc.add_BuildServiceServicer_to_server(BuildServicer(self.manager), server)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(self.manager), server)
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(FleetServicer(self.manager), server)
        self.port = server.add_insecure_port(cfg.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.listen}")
        self._server = server
        await server.start()
        if cfg.metrics_listen:
            host, _, port = cfg.metrics_listen.rpartition(":")
            self._metrics_server, _ = start_http_server(
                int(port), addr=host or "127.0.0.1", registry=self.metrics.registry
            )
            self.metrics_port = self._metrics_server.server_port
        self._watchdog = asyncio.create_task(self._expire_silent_agents(), name="agent-watchdog")
        log.info("coordinator listening on port %d (data in %s)", self.port, cfg.data_dir)

    async def _expire_silent_agents(self) -> None:
        assert self.manager is not None
        interval = min(1.0, self.config.agent_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            deadline = time.time() - self.config.agent_timeout
            for session in list(self.manager.sessions.values()):
                if session.last_seen < deadline:
                    self.manager.detach_agent(session, "went silent (lease expired)")
            self.manager.expire_orphans()

    async def stop(self, grace: float = 5.0) -> None:
        """Stops in a fixed order: watchdog, listeners, builds, clients, store. Idempotent."""
        if self.status in (Status.CLOSING, Status.CLOSED):
            await self.finished.wait()
            return
        self.status = Status.CLOSING
        try:
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self.manager is not None:
                for session in list(self.manager.sessions.values()):
                    session.close()
            if self._server is not None:
                await self._server.stop(grace)
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            if self.manager is not None:
                await self.manager.close()
            if self._registry is not None:
                await self._registry.aclose()
            if self._store is not None:
                self._store.close()
        finally:
            self.status = Status.CLOSED
            self.finished.set()

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0] or "127.0.0.1"
        return f"{host}:{self.port}"


async def serve(config: CoordinatorConfig) -> int:
    coordinator = Coordinator(config)
    try:
        await coordinator.start()
    except Exception as exc:
        log.error("coordinator failed to start: %s", exc)
        return EXIT_START_FAILED
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"polyarch coordinator listening on {coordinator.address}", flush=True)
    await stop.wait()
    log.info("signal received: stopping gracefully")
    await coordinator.stop(grace=10.0)
    return EXIT_OK


def run_coordinator(args: argparse.Namespace) -> int:
    """Entry point of `polyarch coordinator`."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = CoordinatorConfig(
        listen=args.listen,
        data_dir=Path(args.data_dir),
        metrics_listen=args.metrics_listen or "",
        insecure_registries=list(getattr(args, "insecure_registry", None) or []),
        docker_config=Path(args.docker_config) if getattr(args, "docker_config", None) else None,
        agent_timeout=float(getattr(args, "agent_timeout", 10.0)),
    )
    return asyncio.run(serve(config))

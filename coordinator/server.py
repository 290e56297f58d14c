"""The coordinator process: wiring, lifecycle (idempotent start/stop) and the CLI entry point."""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import os
import signal
import time
from typing import Any

import grpc
from prometheus_client import start_http_server

from polyarch.coordinator.config import ConfigError, CoordinatorConfig, config_from
from polyarch.coordinator.contexts.gc import ContextCollector, digests_in_use
from polyarch.coordinator.contexts.store import ContextStore
from polyarch.coordinator.core.manager import BuildManager
from polyarch.coordinator.core.postgres_store import PostgresStore
from polyarch.coordinator.core.sqlite_store import SQLiteStore
from polyarch.coordinator.core.store import StateStore
from polyarch.coordinator.database_address import read_database_file, redacted_dsn
from polyarch.coordinator.exports.exporter import BuildExporter
from polyarch.coordinator.ha.candidacy import EXIT_DEMOTED, Candidacy, dialled_address
from polyarch.coordinator.ha.election import Election, Term
from polyarch.coordinator.ha.gate import ActiveGate
from polyarch.coordinator.metrics import CoordinatorMetrics
from polyarch.coordinator.registry.assembly import IndexPublisher
from polyarch.coordinator.registry.client import RegistryClient
from polyarch.coordinator.registry.credentials import CredentialStore
from polyarch.coordinator.registry.gate import GatePolicy, SupplyChainGate
from polyarch.coordinator.registry.provenance import builder_id
from polyarch.coordinator.trust.auth import Authenticator, AuthInterceptor, TokenBook
from polyarch.coordinator.trust.pki import ServerTLS, server_names
from polyarch.coordinator.trust.setup import Trust, open_trust
from polyarch.coordinator.trust.store import create_private_database
from polyarch.coordinator.wire.agent_servicer import AgentServicer
from polyarch.coordinator.wire.build_servicer import BuildServicer
from polyarch.coordinator.wire.fleet_servicer import FleetServicer
from polyarch.coordinator.wire.trust_servicer import TrustServicer
from polyarch.proto.agent_protocol import heartbeat_interval_for
from polyarch.proto.registries import is_loopback_address
from polyarch.proto.v1 import agent_pb2_grpc, build_pb2_grpc, fleet_pb2_grpc, trust_pb2_grpc

log = logging.getLogger(__name__)

# Exit codes of `polyarch coordinator`.
EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_USAGE = 2
# EXIT_DEMOTED (4, coordinator/ha/candidacy.py): stepped down as the active one; restart it.

# Keepalive: notice a silent network (no RST) within about 30 s even between heartbeats.
_SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def default_agent_listen(listen: str) -> str:
    """The agent channel's address: the API's host, the next port (0 stays 0)."""
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + 1 if int(port) else 0}"


def refuse_insecure_off_loopback(addresses: list[str]) -> None:
    """--insecure is for one machine: every listen address must be loopback."""
    for address in addresses:
        if not is_loopback_address(address):
            raise ValueError(
                f"--insecure refused: {address} is not a loopback address "
                "(plaintext without authentication is for 127.0.0.1/::1 only)"
            )


def _service_names() -> list[str]:
    from polyarch.proto.v1 import agent_pb2, build_pb2, fleet_pb2, trust_pb2

    return [
        build_pb2.DESCRIPTOR.services_by_name["BuildService"].full_name,
        agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        fleet_pb2.DESCRIPTOR.services_by_name["FleetService"].full_name,
        trust_pb2.DESCRIPTOR.services_by_name["TrustService"].full_name,
    ]


async def add_health_and_reflection(server: grpc.aio.Server) -> Any:
    """The standard gRPC health service (no token needed) and reflection (a read token).
    Returns the health servicer: "" (the process) SERVING; the polyarch services start
    NOT_SERVING, and set_serving() turns them on while this coordinator is the active one."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer
    from grpc_reflection.v1alpha import reflection

    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = _service_names()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await set_serving(health_servicer, False)
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    return health_servicer


async def set_serving(health_servicer: Any, serving: bool) -> None:
    """The polyarch services' health: SERVING on the active coordinator only (a standby
    refuses them), so a load balancer's health check picks the active one."""
    from grpc_health.v1 import health_pb2

    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in _service_names():
        await health_servicer.set(name, status)


class Status(enum.Enum):
    INIT = "init"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


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
        self._store: StateStore | None = None
        self._registry: RegistryClient | None = None
        self._publisher: IndexPublisher | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._context_gc: asyncio.Task[None] | None = None
        self.trust: Trust | None = None
        self.manager: BuildManager | None = None
        self.tokens: TokenBook | None = None
        self.server_tls: ServerTLS | None = None
        self.agent_port = 0
        self.gate = ActiveGate()
        self.candidacy: Candidacy | None = None
        self._contexts: ContextStore | None = None
        self._health: Any = None

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
        agent_listen = cfg.agent_listen or default_agent_listen(cfg.listen)
        if cfg.insecure:
            refuse_insecure_off_loopback([cfg.listen])
            log.warning("--insecure: plaintext and no authentication; loopback only")
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(cfg.data_dir, 0o700)
        dsn = read_database_file(cfg.database_file) if cfg.database_file else cfg.database
        if not dsn:
            create_private_database(cfg.data_dir / "state.sqlite3")  # builds and trust both
        self._store = await self._open_state_store(dsn)
        self._registry = RegistryClient(
            credentials=CredentialStore.from_docker_config(cfg.docker_config),
            insecure_registries=cfg.insecure_registries,
            timeout=cfg.registry_timeout,
            on_request_error=lambda kind: self.metrics.registry_errors.labels(kind=kind).inc(),
        )
        context_dir = cfg.context_dir or cfg.data_dir / "contexts"
        self._contexts = contexts = ContextStore(context_dir, cfg.limits)
        gate = SupplyChainGate(
            GatePolicy(
                scan_command=cfg.scan_command, scan_timeout=cfg.scan_timeout,
                allow_build_scan_command=cfg.allow_build_scan_command,
                immutable_tags=cfg.immutable_tags, sign_key=cfg.sign_key,
            ),
            lambda outcome: self.metrics.scans.labels(outcome=outcome).inc(),
        )  # fmt: skip
        self._publisher = IndexPublisher(
            self._registry, gate, builder_id(cfg.advertise[0] if cfg.advertise else "")
        )
        self._exporter = BuildExporter(self._registry, cfg.data_dir / "exports", self.metrics)
        self.manager = BuildManager(
            self._store, contexts, self._publisher, self.metrics,
            limits=cfg.limits, scratch_repository=cfg.scratch_repository,
            gate=gate, registry=self._registry,
        )  # fmt: skip
        self.metrics.context_store_bytes.set_function(lambda: contexts.stored_bytes)
        self.metrics.context_uploads_in_flight.set_function(lambda: contexts.uploads.in_flight)
        # a lease is LEASE_HEARTBEATS missed heartbeats: agents learn the interval in Welcome
        self.manager.heartbeat_interval = heartbeat_interval_for(cfg.agent_timeout)
        # tokens, enrolments, drains and the CA: in PostgreSQL with --database, shared by
        # every coordinator on it; else in the data dir (state.sqlite3, tls/)
        names = server_names([cfg.listen, agent_listen], cfg.advertise)
        self.trust = trust = await open_trust(cfg, dsn, names)
        self.manager.roster.keep_drains(trust.store)
        # the manager starts (state loaded, dispatch on) only once this one is the active
        # coordinator; until then the gate, first of all, refuses every RPC but health
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = [self.gate]
        authority = trust.authority
        self.server_tls, self.tokens = trust.server_tls, trust.tokens
        if self.tokens is not None:
            authenticator = Authenticator(self.tokens, require_enrolment=authority is not None)
            refusals = self.metrics.auth_refusals
            interceptors.append(
                AuthInterceptor(authenticator, lambda why: refusals.labels(reason=why).inc())
            )
        options = [
            *_SERVER_OPTIONS,
            ("grpc.max_receive_message_length", cfg.limits.max_request_bytes),
        ]
        server = grpc.aio.server(options=options, interceptors=interceptors)
        manager = self.manager
        builds = BuildServicer(manager, self._exporter)
        build_pb2_grpc.add_BuildServiceServicer_to_server(builds, server)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(manager), server)
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(FleetServicer(manager), server)
        if self.tokens is not None:
            trust_servicer = TrustServicer(
                self.tokens, authority, lambda: self.agent_port,
                manager.disconnect_agent,
            )  # fmt: skip
            trust_pb2_grpc.add_TrustServiceServicer_to_server(trust_servicer, server)
        self._health = await add_health_and_reflection(server)
        self.port, self.agent_port = self._add_ports(server, agent_listen)
        self._server = server
        # the ports are bound (what the term records): a lone coordinator, or one without
        # --database, is active before the first RPC arrives, as before the election existed
        self.candidacy = Candidacy(
            self._election(dsn, agent_listen), self.gate, self._promote, self._announce
        )
        if isinstance(self._store, PostgresStore):
            self._store.on_fenced = lambda: self._demote("a commit was fenced")
        await self.candidacy.start()
        await server.start()
        if cfg.metrics_listen:
            host, _, port = cfg.metrics_listen.rpartition(":")
            self._metrics_server, _ = start_http_server(
                int(port), addr=host or "127.0.0.1", registry=self.metrics.registry
            )
            self.metrics_port = self._metrics_server.server_port
        log.info(
            "coordinator listening on port %d, agents on %d (%s; data in %s)", self.port,
            self.agent_port, "PLAINTEXT" if cfg.insecure else "TLS", cfg.data_dir,
        )  # fmt: skip

    def _election(self, dsn: str, agent_listen: str) -> Election | None:
        """With --database every coordinator is a candidate: it records what clients (and
        agents) dial, the first --advertise name with the bound ports."""
        cfg = self.config
        if not dsn or not cfg.election:
            return None
        return Election(
            dsn, dialled_address(cfg.listen, cfg.advertise, self.port),
            agents=dialled_address(agent_listen, cfg.advertise, self.agent_port),
        )  # fmt: skip

    async def _promote(self, term: Term | None) -> None:
        """Becomes the active coordinator: fenced to the term before anything is written,
        then the state reloaded as after a restart, dispatch on, the agent watchdog and GC."""
        assert self.manager is not None and self._contexts is not None
        if term is not None and isinstance(self._store, PostgresStore):
            self._store.fence_epoch = term.epoch
        await self.manager.start(reattach_grace=self.config.agent_timeout)
        self._watchdog = asyncio.create_task(self._expire_silent_agents(), name="agent-watchdog")
        self._context_gc = asyncio.create_task(
            self._collector(self._contexts).run(self.config.context_gc_interval),
            name="context-gc",
        )
        if term is not None:
            self.metrics.failovers.inc()

    async def _announce(self, active: bool) -> None:
        self.metrics.coordinator_active.set(1 if active else 0)
        if self._health is not None:
            await set_serving(self._health, active)

    def _demote(self, reason: str) -> None:
        if self.candidacy is not None:
            self.candidacy.demote(reason)

    @property
    def lost(self) -> asyncio.Event | None:
        """Set once this coordinator stepped down (serve() then exits with EXIT_DEMOTED)."""
        return self.candidacy.lost if self.candidacy is not None else None

    async def _open_state_store(self, dsn: str) -> StateStore:
        """PostgreSQL when --database or --database-file says so, else SQLite in data_dir."""
        cfg, metrics = self.config, self.metrics
        observers = (metrics.store_write_seconds.observe, metrics.store_commit_writes.observe,
                     metrics.store_commit_seconds.observe)  # fmt: skip
        if dsn:
            store = await PostgresStore.open(dsn, *observers)
            log.info("build state in %s", redacted_dsn(dsn))  # never the password
            return store
        return SQLiteStore(cfg.data_dir / "state.sqlite3", *observers)

    def _add_ports(self, server: grpc.aio.Server, agent_listen: str) -> tuple[int, int]:
        """The API port (TLS, tokens) and the agent port (mTLS); one plaintext port if insecure."""
        cfg = self.config
        if self.server_tls is None:
            port = server.add_insecure_port(cfg.listen)
            if port == 0:
                raise OSError(f"cannot listen on {cfg.listen}")
            return port, port
        pair = [(self.server_tls.server_key_pem, self.server_tls.server_cert_pem)]
        api = server.add_secure_port(cfg.listen, grpc.ssl_server_credentials(pair))
        agents = server.add_secure_port(
            agent_listen,
            grpc.ssl_server_credentials(
                pair, root_certificates=self.server_tls.client_ca_pem, require_client_auth=True
            ),
        )
        if api == 0 or agents == 0:
            raise OSError(f"cannot listen on {cfg.listen} and {agent_listen}")
        return api, agents

    def _collector(self, contexts: ContextStore) -> ContextCollector:
        manager = self.manager
        assert manager is not None

        def deleted(count: int, size: int) -> None:
            self.metrics.contexts_deleted.inc(count)
            self.metrics.context_bytes_deleted.inc(size)

        return ContextCollector(contexts, lambda: digests_in_use(manager.ledger), deleted)

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
            self.manager.expire_overdue_jobs()
            # the scrape thread reads this copy, never the loop's live state
            self.manager.roster.publish_fleet()

    async def stop(self, grace: float = 5.0) -> None:
        """Stops in a fixed order: watchdog, listeners, builds, clients, store. Idempotent."""
        if self.status in (Status.CLOSING, Status.CLOSED):
            await self.finished.wait()
            return
        self.status = Status.CLOSING
        try:
            self.gate.close("this coordinator is stopping")
            for task in (self._watchdog, self._context_gc):
                if task is not None:
                    task.cancel()
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
            if self._publisher is not None:
                await self._publisher.aclose()
            if self._registry is not None:
                await self._registry.aclose()
            if self._store is not None:
                await self._store.close()
            if self.candidacy is not None:
                # after the last commit: a standby takes over at once, nothing in flight
                await self.candidacy.close()
            if self.trust is not None:
                await self.trust.close()
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
    waits = [asyncio.create_task(stop.wait(), name="signal")]
    lost = coordinator.lost
    if lost is not None:
        waits.append(asyncio.create_task(lost.wait(), name="demotion"))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    if lost is not None and lost.is_set():
        reason = coordinator.candidacy.reason if coordinator.candidacy else ""
        log.error(
            "exiting with code %d (%s): a supervisor restarts this coordinator as a standby",
            EXIT_DEMOTED, reason,
        )  # fmt: skip
        try:  # a database gone silent must not hold the exit: the supervisor is waiting
            await asyncio.wait_for(coordinator.stop(grace=0), DEMOTED_STOP_SECONDS)
        except TimeoutError:
            # what is left waits on that database (psycopg's cancellations included), and
            # every write of this term is fenced anyway: nothing is lost by leaving now
            log.error("the stop did not finish within %g s; exiting now", DEMOTED_STOP_SECONDS)
            logging.shutdown()
            os._exit(EXIT_DEMOTED)
        return EXIT_DEMOTED
    log.info("signal received: stopping gracefully")
    await coordinator.stop(grace=10.0)
    return EXIT_OK


# How long a demoted coordinator's stop may take before it exits regardless.
DEMOTED_STOP_SECONDS = 5.0


def run_coordinator(args: argparse.Namespace) -> int:
    """Entry point of `polyarch coordinator`."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    return asyncio.run(serve(config))

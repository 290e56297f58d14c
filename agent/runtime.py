"""The agent process: keeps one stream to the coordinator and runs assigned builds in slots."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import start_http_server

from polyarch.agent.builders.base import Builder, BuildFailed, BuildRequest
from polyarch.agent.config import AgentConfig
from polyarch.agent.context_unpack import check_tar_safety
from polyarch.agent.coordinators import Rotation, split_addresses
from polyarch.agent.job_credentials import write_job_credentials
from polyarch.agent.metrics import AgentMetrics
from polyarch.agent.outbox import Outbox, Stream
from polyarch.agent.workspace import Workspace
from polyarch.proto.active_coordinator import standby_named
from polyarch.proto.platforms import parse_platform
from polyarch.proto.references import registry_of
from polyarch.proto.registries import polyarch_version, registry_is_plain_http
from polyarch.proto.trust import aio_channel
from polyarch.proto.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

VERSION = polyarch_version()
# Exit codes of `polyarch agent`.
EXIT_OK = 0
EXIT_BUILDER_UNAVAILABLE = 2
EXIT_IDENTITY_REFUSED = 3  # enrolment refused, or the coordinator rejects our certificate

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 << 20),
]


class IdentityRefused(Exception):
    """The coordinator refuses this agent's identity; retrying cannot help."""


def registry_is_insecure(repository: str, insecure: list[str]) -> bool:
    """Plain HTTP for the repository's registry (loopback, or named with --insecure-registry)."""
    return registry_is_plain_http(registry_of(repository), insecure)


class Agent:
    """Connects (and reconnects, with bounded backoff) and runs up to `slots` builds at once."""

    def __init__(self, config: AgentConfig, builder: Builder) -> None:
        self.config = config
        self.builder = builder
        self.metrics = AgentMetrics(config.slots)
        self.workspace = Workspace(config.workspace_dir(), self.metrics.context_bytes_fetched.inc)
        # the coordinator owns the lease, so its Welcome replaces this (see _handle)
        self.heartbeat_interval = config.heartbeat_interval
        self._streams = 0
        self._started: dict[tuple[str, int], float] = {}
        self.jobs: dict[str, tuple[int, asyncio.Task[None]]] = {}
        # Survives reconnects: results produced while disconnected are sent on the next stream.
        self.outbox = Outbox()
        self._stream = Stream()
        self.connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._handing_back = False
        self._shutdown_started = False
        self._channel: grpc.aio.Channel | None = None
        # the agent channels of the coordinators given (an active one, standbys), in order
        addresses = split_addresses(config.channel_address or config.coordinator)
        self.rotation = Rotation(addresses, max_delay=config.reconnect_max_delay)

    async def run(self) -> None:
        """Runs until shutdown(): connect, serve the stream, reconnect: at once to the
        active coordinator a standby names, else to the next one given after a pause."""
        while not self._stopping.is_set():
            active = ""  # a standby's refusal: the active coordinator it names
            try:
                await self._serve_once(self.rotation.current)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                    # the hello itself is wrong (name, slots, platforms): retrying won't help
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    raise IdentityRefused(_describe(exc)) from None
                active = standby_named(exc)
                self._ended(exc, active)
            except OSError as exc:
                self._ended(exc, "")
            except asyncio.CancelledError:
                # closing the channel on shutdown cancels the call; anything else is real
                if not self._stopping.is_set():
                    raise
            self.connected.clear()
            self.metrics.connected.set(0)
            if self._stopping.is_set():
                break
            delay = self.rotation.after_failure(active)  # 0: a standby named the active one
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _ended(self, exc: BaseException, active: str) -> None:
        where = self.rotation.current
        if active:
            log.info("coordinator %s is a standby; the active one is %s", where, active)
        else:
            log.warning("coordinator stream to %s ended: %s", where, _describe(exc))

    async def shutdown(self, grace: float = 0.0) -> None:
        """Drains: tells the coordinator, lets running builds finish for up to `grace`
        seconds, then hands the rest back (cancelled, reported as retryable). Idempotent."""
        if self._shutdown_started:
            await self._stopping.wait()
            return
        self._shutdown_started = True
        tasks = [task for _, task in self.jobs.values()]
        if tasks and grace > 0:
            self._send(agent_pb2.AgentMessage(draining=agent_pb2.AgentDraining(reason="shutdown")))
            log.info("draining: waiting up to %.0f s for %d job(s)", grace, len(tasks))
            await asyncio.wait(tasks, timeout=grace)
        self._handing_back = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # give the stream a moment to carry the hand-back results before it closes
        deadline = asyncio.get_running_loop().time() + 3.0
        while not self.outbox.empty() and self.connected.is_set():
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        self._stopping.set()
        if self._channel is not None:
            await self._channel.close(None)

    def _running(self) -> list[agent_pb2.RunningJob]:
        return [agent_pb2.RunningJob(job_id=j, attempt=a) for j, (a, _) in self.jobs.items()]

    async def _serve_once(self, address: str) -> None:
        cfg = self.config
        if self._streams:
            self.metrics.reconnects.inc()
        self._streams += 1
        self._channel = aio_channel(address, cfg.trust, _CHANNEL_OPTIONS)
        async with self._channel as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            hello = agent_pb2.AgentHello(
                name=cfg.name, version=VERSION, builder=self.builder.name,
                native_platforms=[str(p) for p in cfg.native or ()],
                emulated_platforms=[str(p) for p in cfg.emulated or ()],
                slots=cfg.slots, labels=cfg.labels, running=self._running(),
            )  # fmt: skip
            self._stream = stream = Stream()
            call = stub.Connect(self.outbox.requests(agent_pb2.AgentMessage(hello=hello), stream))
            heartbeat = asyncio.create_task(self._heartbeat())
            try:
                async for message in call:
                    self._handle(stub, message)
            finally:
                heartbeat.cancel()
                call.cancel()
                self.outbox.ended(stream)

    async def _heartbeat(self) -> None:
        # not before the Welcome: its interval may be far shorter than the fallback
        await self.connected.wait()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self.outbox.put_nowait(
                agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(running=self._running()))
            )

    def _handle(
        self, stub: agent_pb2_grpc.AgentServiceStub, message: agent_pb2.CoordinatorMessage
    ) -> None:
        kind = message.WhichOneof("message")
        if kind == "welcome":
            self.heartbeat_interval = heartbeat_interval_from(
                message.welcome, self.config.heartbeat_interval
            )
            self.rotation.connected()
            self._stream.welcomed.set()
            self.connected.set()
            self.metrics.connected.set(1)
            log.info(
                "connected to coordinator %s as %s (%d job(s) running)",
                self.rotation.current, self.config.name, len(self.jobs),
            )  # fmt: skip
        elif kind == "assign":
            job = message.assign
            current = self.jobs.get(job.job_id)
            if current is not None and current[0] >= job.attempt:
                return  # this attempt (or a newer one) already runs here
            if current is not None:
                # an older attempt is still winding down (its result already went out, or the
                # coordinator gave up on it): the new attempt must not wait for, or be lost to, it
                current[1].cancel()
            task = asyncio.create_task(self._run_job(stub, job), name=f"job-{job.job_id}")
            self.jobs[job.job_id] = (job.attempt, task)
            self.metrics.slots_in_use.set(len(self.jobs))
            task.add_done_callback(lambda _task: self._forget(job.job_id, job.attempt))
        elif kind == "cancel":
            entry = self.jobs.get(message.cancel.job_id)
            if entry is not None and entry[0] == message.cancel.attempt:
                log.info("cancelling job %s: %s", message.cancel.job_id, message.cancel.reason)
                entry[1].cancel()

    def _forget(self, job_id: str, attempt: int) -> None:
        if job_id in self.jobs and self.jobs[job_id][0] == attempt:
            del self.jobs[job_id]
        self.metrics.slots_in_use.set(len(self.jobs))

    def _send(self, message: agent_pb2.AgentMessage) -> None:
        self.outbox.put_nowait(message)

    async def _run_job(
        self, stub: agent_pb2_grpc.AgentServiceStub, job: agent_pb2.Assignment
    ) -> None:
        job_id, attempt = job.job_id, job.attempt
        self._started[(job_id, attempt)] = time.monotonic()
        self._send(
            agent_pb2.AgentMessage(started=agent_pb2.JobStarted(job_id=job_id, attempt=attempt))
        )
        log.info("job %s attempt %d: building %s", job.job_id, job.attempt, job.platform)
        job_dir: Path | None = None
        step = "prepare"
        try:
            # refuses an unsafe job id or attempt before anything touches disk
            job_dir = self.workspace.job_dir(job.job_id, job.attempt)
            step = "fetch context"
            began = time.monotonic()
            context_dir = await self.workspace.fetch_context(
                stub, job.context_digest, job_dir, job.dockerfile or "Dockerfile",
                self.builder.may_link_context,
            )  # fmt: skip
            fetched = time.monotonic()
            step = "build"
            insecure = registry_is_insecure(job.repository, self.config.insecure_registries)
            own = write_job_credentials(job_dir, job)
            request = BuildRequest(
                context_dir=context_dir, dockerfile=job.dockerfile or "Dockerfile",
                platform=parse_platform(job.platform), image=f"{job.repository}:{job.push_tag}",
                build_args=dict(job.build_args), target=job.target, labels=dict(job.labels),
                insecure_registry=insecure,
                cache_from=list(job.cache_from), cache_to=list(job.cache_to),
                secrets=own.secrets, docker_config_dir=own.docker_config_dir,
                auth_file=own.auth_file, no_cache=job.no_cache, pull=job.pull,
            )  # fmt: skip

            def on_line(line: str) -> None:
                self._send(agent_pb2.AgentMessage(
                    log=agent_pb2.JobLog(job_id=job_id, attempt=attempt, lines=[line])
                ))  # fmt: skip

            try:
                async with asyncio.timeout(self.config.job_timeout):
                    pushed = await self.builder.build_and_push(request, on_line)
            except TimeoutError:
                # e.g. BuildKit 20.10 hangs when an emulated step's PID 1 segfaults
                raise BuildFailed(
                    "build", f"no result after {self.config.job_timeout:.0f} s (job timeout)", True
                ) from None
            # a size of 0 (buildah does not tell it) is fine: the coordinator reads every
            # child from the registry when it verifies the build, so no round trip here
            self._result(job, ok=True, digest=pushed.digest, size=pushed.size,
                         media_type=pushed.media_type)  # fmt: skip
            log.info(
                "job %s attempt %d: pushed %s (context %.3f s, build and push %.3f s)",
                job.job_id, job.attempt, pushed.digest, fetched - began, time.monotonic() - fetched,
            )  # fmt: skip
        except asyncio.CancelledError:
            log.info("job %s attempt %d: cancelled", job.job_id, job.attempt)
            if self._handing_back:
                reason = f"agent {self.config.name} shut down before the job finished"
                self._result(job, ok=False, failed_step=step, infrastructure_error=True,
                             error=reason)  # fmt: skip
            raise
        except BuildFailed as exc:
            self._result(job, ok=False, error=exc.message, failed_step=exc.step,
                         infrastructure_error=exc.infrastructure)  # fmt: skip
        except Exception as exc:  # the agent's own fault: report it, retryable elsewhere
            log.exception("job %s failed in step %s", job.job_id, step)
            self._result(job, ok=False, error=f"{type(exc).__name__}: {exc}", failed_step=step,
                         infrastructure_error=True)  # fmt: skip
        finally:
            if job_dir is not None:
                await asyncio.to_thread(shutil.rmtree, job_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                trimmed = await self.workspace.trim_cache()
                if trimmed:
                    log.info("context cache: deleted %d unused context(s)", len(trimmed))

    def _result(self, job: agent_pb2.Assignment, **fields: Any) -> None:
        result = agent_pb2.JobResult(job_id=job.job_id, attempt=job.attempt, **fields)
        self._send(agent_pb2.AgentMessage(result=result))
        started = self._started.pop((job.job_id, job.attempt), None)
        if started is not None:
            self.metrics.job_duration.labels(platform=job.platform).observe(
                time.monotonic() - started
            )
        outcome = "pushed" if result.ok else "handed_back" if self._handing_back else "failed"
        self.metrics.jobs.labels(platform=job.platform, result=outcome).inc()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


def make_builder(
    kind: str, work_dir: Path, docker_binary: str | None = None, storage_dir: Path | None = None
) -> Builder:
    """The agent's builder backend: "docker" (BuildKit through a docker CLI) or "buildah"."""
    if kind == "docker":
        from polyarch.agent.builders.docker import DockerBuilder

        return DockerBuilder(docker_binary or "docker")
    from polyarch.agent.builders.buildah import BuildahBuilder

    # one containers-storage per platform under the work dir: concurrent slots are safe
    return BuildahBuilder(storage_root=storage_dir or work_dir / "buildah-storage")


async def serve(config: AgentConfig, builder: Builder) -> int:
    from polyarch.agent.builders.base import BuilderUnavailable

    try:
        await builder.check()
    except BuilderUnavailable as exc:
        log.error("%s", exc)
        return EXIT_BUILDER_UNAVAILABLE
    log.info("%s", check_tar_safety())
    agent = Agent(config, builder)
    metrics_server = None
    if config.metrics_listen:
        host, _, port = config.metrics_listen.rpartition(":")
        metrics_server, _ = start_http_server(
            int(port), addr=host or "127.0.0.1", registry=agent.metrics.registry
        )
    loop = asyncio.get_running_loop()
    runner = asyncio.create_task(agent.run())
    stopping: set[asyncio.Task[None]] = set()

    def on_signal() -> None:
        # SIGTERM/SIGINT drain gracefully; the task is kept so it is not collected early
        stopping.add(asyncio.ensure_future(agent.shutdown(config.shutdown_grace)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await runner
        await asyncio.gather(*stopping)
    except IdentityRefused as exc:
        log.error("the coordinator refuses this agent: %s", exc)
        return EXIT_IDENTITY_REFUSED
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
    return EXIT_OK


def heartbeat_interval_from(welcome: agent_pb2.Welcome, fallback: float) -> float:
    """The pace a Welcome sets (floor 100 ms); a coordinator that sends 0 gets `fallback`."""
    if welcome.heartbeat_interval_ms <= 0:
        return fallback
    return max(0.1, welcome.heartbeat_interval_ms / 1000)


def run_agent(config: AgentConfig, args: argparse.Namespace) -> int:
    """Entry point of `polyarch agent`: `args` carries only the credential flags and --replace."""
    from polyarch.agent.detect import detect_platforms
    from polyarch.agent.enrolment import EnrolmentError, IdentityRefusedAtStart, channel_trust
    from polyarch.client.credentials import CredentialsError, credentials_from_args
    from polyarch.proto.trust import PinMismatch

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = detect_platforms(config)  # only what the file and flags left unset
    try:
        # an enrolled agent needs no token; enrolment does
        credentials = credentials_from_args(args, require_token=False)
        replace = bool(getattr(args, "replace", False))
        trust, channel_address = asyncio.run(channel_trust(config, credentials, replace))
    except (EnrolmentError, IdentityRefusedAtStart, PinMismatch, CredentialsError) as exc:
        log.error("%s", exc)
        return EXIT_IDENTITY_REFUSED
    except OSError as exc:
        log.error("cannot reach the coordinator at %s to enrol: %s", config.coordinator, exc)
        return EXIT_IDENTITY_REFUSED
    config = dataclasses.replace(config, trust=trust, channel_address=channel_address)
    builder = make_builder(
        config.builder, config.workspace_dir(), config.docker_binary, config.storage_dir
    )
    return asyncio.run(serve(config, builder))

"""`polyarch deploy`: install, upgrade, check and remove agents on SSH hosts, host by host."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from polyarch.client.api import BuildClient
from polyarch.ops import agent_host as on_host
from polyarch.ops.coordinator_view import CoordinatorView
from polyarch.ops.inventory import Host, Inventory
from polyarch.ops.qemu import QemuReport, qemu_handlers, register_qemu, registers_qemu
from polyarch.ops.ssh import HostError, RemoteHost
from polyarch.ops.wheelhouse import Wheelhouse, WheelTarget, build_wheelhouse

# how long a rolled-back agent (the version that ran before) may take to reconnect
ROLLBACK_TIMEOUT = 90.0


@dataclass
class HostResult:
    """One row of deploy's table: what happened on a host, and how long it took."""

    host: str
    action: str
    before: str = ""
    after: str = ""
    seconds: float = 0.0
    error: str = ""
    service: str = ""
    connected: bool = False
    qemu: QemuReport | None = None  # registered by install, or read by status


@dataclass
class DeployOptions:
    known_hosts: Path
    accept_new_host_keys: bool = False
    parallel: int = 4
    connect_timeout: float = 15.0
    start_timeout: float = 90.0
    drain_timeout: float = 600.0
    max_unavailable: int = 1
    dry_run: bool = False
    with_qemu: bool = False  # register QEMU handlers where the inventory does not say
    project: Path | None = None  # the source tree whose wheel is installed (this one)
    wheel_dir: Path | None = None  # where wheelhouses are built (a temporary folder)


@dataclass
class Deployment:
    """One run over an inventory, with the coordinator's API for the checks that matter."""

    inventory: Inventory
    coordinator: CoordinatorView
    options: DeployOptions
    _wheelhouses: dict[str, Wheelhouse] = field(default_factory=dict)
    # upgrade: host name -> (its facts, the version installed beside) from the first pass
    _prepared: dict[str, tuple[on_host.HostFacts, str]] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def wheels_for(self, facts: on_host.HostFacts) -> list[Path]:
        """The wheelhouse for the host's Python and machine (built once per target)."""
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(facts.machine, facts.machine)
        glibc = facts.glibc if facts.glibc != "?" else "2.17"
        target = WheelTarget.parse(facts.python, arch, glibc)
        async with self._lock:  # pip's cache is locked anyway; one build per target
            if target.name not in self._wheelhouses:
                assert self.options.wheel_dir is not None
                dest = self.options.wheel_dir / target.name
                self._wheelhouses[target.name] = await asyncio.to_thread(
                    build_wheelhouse, dest, target, project=self.options.project
                )
        return list(self._wheelhouses[target.name].wheels)

    async def on_each(
        self,
        hosts: list[Host],
        action: str,
        work: Callable[[RemoteHost, HostResult], Awaitable[None]],
        parallel: int,
        stop_on_failure: bool = False,
    ) -> list[HostResult]:
        """Runs `work` on every host, `parallel` at a time; a host's failure is its row's
        error and never stops the others, unless `stop_on_failure` (a rollout)."""
        slots = asyncio.Semaphore(parallel)
        stopped = asyncio.Event()

        async def one(host: Host) -> HostResult:
            result = HostResult(host.name, action)
            async with slots:
                if stopped.is_set():
                    result.error = "not attempted: the rollout stopped at an earlier failure"
                    return result
                started = time.monotonic()
                try:
                    remote = await RemoteHost.open(
                        host, self.options.known_hosts, self.options.accept_new_host_keys,
                        self.options.connect_timeout,
                    )  # fmt: skip
                    try:
                        await work(remote, result)
                    finally:
                        await remote.close()
                except HostError as exc:
                    result.error = str(exc)
                except Exception as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
                result.seconds = time.monotonic() - started
                if result.error and stop_on_failure:
                    stopped.set()
            return result

        return list(await asyncio.gather(*(one(h) for h in hosts)))

    # -- the actions ---------------------------------------------------------------------------

    async def install(self, remote: RemoteHost, result: HostResult) -> None:
        host, options = remote.host, self.options
        facts = await on_host.host_facts(remote)
        result.before, result.service = facts.version, facts.service
        qemu = registers_qemu(host, options.with_qemu)
        # before the agent starts: it detects its emulated platforms from binfmt_misc then
        if qemu and not options.dry_run:
            result.qemu = await register_qemu(remote)
        wheels = await self.wheels_for(facts)
        version = on_host.wheel_version(wheels)
        result.after = version
        if options.dry_run:
            would = ", would register QEMU handlers" if qemu else ""
            result.action = f"install (dry run: {len(wheels)} wheels, {facts.service}{would})"
            return
        await on_host.install_version(remote, version, wheels)
        await on_host.switch_current(remote, version)
        await on_host.write_agent_files(
            remote, host, self.inventory.coordinator, self.inventory.token
        )
        await on_host.start_service(remote, host, facts.service)
        await self.coordinator.wait_connected(host.name, version, options.start_timeout)
        result.connected = True
        await on_host.prune_versions(remote, [version, facts.version])

    async def prepare_upgrade(self, remote: RemoteHost, result: HostResult) -> None:
        """Upgrade's first pass, `--parallel` hosts at a time: the new version is installed
        beside the running one (uploads and pip, no downtime), for the rolling pass."""
        host = remote.host
        facts = await on_host.host_facts(remote)
        result.before, result.service = facts.version, facts.service
        if not facts.version:
            raise HostError(f"{host.name}: nothing installed to upgrade: run install first")
        wheels = await self.wheels_for(facts)
        version = on_host.wheel_version(wheels)
        result.after = version
        if version != facts.version:
            await on_host.install_version(remote, version, wheels)
        self._prepared[host.name] = (facts, version)

    async def upgrade(self, remote: RemoteHost, result: HostResult) -> None:
        """The rolling pass: drain, wait for running jobs, switch, restart, wait connected,
        undrain; a new version that does not come up is rolled back and the error stops the
        rollout."""
        host, options = remote.host, self.options
        facts, version = self._prepared[host.name]
        result.before, result.service, result.after = facts.version, facts.service, version
        if version == facts.version:  # already there: nothing to roll
            result.connected = await self.coordinator.connected(host.name) is not None
            return
        await self.coordinator.drain_and_wait(host.name, options.drain_timeout)
        try:
            await on_host.switch_current(remote, version)
            await on_host.start_service(remote, host, facts.service)
            await self.coordinator.wait_connected(host.name, version, options.start_timeout)
        except HostError as exc:
            result.after = facts.version
            await on_host.switch_current(remote, facts.version)
            await on_host.start_service(remote, host, facts.service)
            # the version that ran before gets the longer of the two waits
            back = max(options.start_timeout, ROLLBACK_TIMEOUT)
            await self.coordinator.wait_connected(host.name, facts.version, back)
            await self.coordinator.undrain(host.name)
            raise HostError(f"{exc}; rolled back to {facts.version}") from None
        await self.coordinator.undrain(host.name)
        result.connected = True
        await on_host.prune_versions(remote, [version, facts.version])

    async def uninstall(self, remote: RemoteHost, result: HostResult) -> None:
        host = remote.host
        facts = await on_host.host_facts(remote)
        result.before, result.service = facts.version, facts.service
        if self.options.dry_run:
            return
        await self.coordinator.drain_and_wait(host.name, self.options.drain_timeout)
        await on_host.remove_agent(remote, host, facts.service)
        await self.coordinator.revoke(host.name)
        leftovers = await on_host.left_behind(remote, host)
        if leftovers:
            raise HostError(f"{host.name}: left behind after removal: {', '.join(leftovers)}")

    async def status(self, remote: RemoteHost, result: HostResult) -> None:
        facts = await on_host.host_facts(remote)
        result.before = result.after = facts.version
        result.service = facts.service
        with contextlib.suppress(HostError):  # a row never fails for want of binfmt_misc
            result.qemu = await qemu_handlers(remote)
        agent = await self.coordinator.connected(remote.host.name)
        result.connected = agent is not None
        if agent is not None and agent.version != facts.version:
            result.error = f"connected with version {agent.version}, installed {facts.version}"


async def run_deploy(
    action: str,
    inventory: Inventory,
    client: BuildClient,
    options: DeployOptions,
    hosts: list[Host],
) -> list[HostResult]:
    """Runs one action over the chosen hosts; upgrades roll, the others run in parallel."""
    deployment = Deployment(inventory, CoordinatorView(client), options)
    work = {
        "install": deployment.install, "upgrade": deployment.upgrade,
        "uninstall": deployment.uninstall, "status": deployment.status,
    }[action]  # fmt: skip
    if action == "upgrade":
        return await _roll(deployment, hosts, options)
    return await deployment.on_each(hosts, action, work, options.parallel)


async def _roll(
    deployment: Deployment, hosts: list[Host], options: DeployOptions
) -> list[HostResult]:
    """Upgrade in two passes: install beside on `parallel` hosts at a time, then roll
    `max_unavailable` at a time. A host where the new version does not install stops the
    rollout before any agent is drained."""
    prepared = await deployment.on_each(hosts, "upgrade", deployment.prepare_upgrade,
                                        options.parallel)  # fmt: skip
    if any(r.error for r in prepared):
        for r in prepared:
            if not r.error:
                r.error = "not attempted: the new version did not install on every host"
        return prepared
    rolled = await deployment.on_each(
        hosts, "upgrade", deployment.upgrade, options.max_unavailable, stop_on_failure=True
    )
    for row, first in zip(rolled, prepared, strict=True):
        row.seconds += first.seconds
    return rolled

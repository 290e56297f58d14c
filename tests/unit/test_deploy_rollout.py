"""`deploy upgrade`'s two passes: the new version installed beside the old on `--parallel`
hosts at once, then the roll `--max-unavailable` at a time; an install failure stops the
rollout before any agent is drained. Hosts and the coordinator are fakes recording events."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from polyarch.client.cli import build_parser
from polyarch.ops import agent_host, deploy
from polyarch.ops.agent_host import HostFacts
from polyarch.ops.deploy import DeployOptions, HostResult, run_deploy
from polyarch.ops.inventory import Host, Inventory
from polyarch.ops.ssh import HostError

HOSTS = [Host(f"h{i}", f"10.0.0.{i}") for i in range(1, 4)]


class FakeRemote:
    def __init__(self, host: Host) -> None:
        self.host = host

    async def close(self) -> None:
        return None


class Recorder:
    """Events in order, and the most steps of one kind seen running at once."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}

    async def step(self, kind: str, host: str) -> None:
        self.events.append(f"{kind} {host}")
        self.running[kind] = self.running.get(kind, 0) + 1
        self.most[kind] = max(self.most.get(kind, 0), self.running[kind])
        await asyncio.sleep(0.01)  # lets the other hosts' tasks in: concurrency shows
        self.running[kind] -= 1


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    seen = Recorder()

    async def open_remote(host: Host, *_args: Any) -> FakeRemote:
        return FakeRemote(host)

    async def facts(remote: FakeRemote) -> HostFacts:
        return HostFacts("x86_64", "3.11", "2.36", "systemd", "0.1.0")

    async def install_version(remote: FakeRemote, version: str, wheels: list[Path]) -> bool:
        if remote.host.name == getattr(seen, "broken", None):
            raise HostError(f"{remote.host.name}: pip failed")
        await seen.step("install", remote.host.name)
        return True

    async def on_host(remote: FakeRemote, *_args: Any) -> None:
        await seen.step("host-step", remote.host.name)

    async def wheels(self: Any, facts: HostFacts) -> list[Path]:
        return [Path("polyarch-0.1.1-py3-none-any.whl")]

    monkeypatch.setattr(deploy.RemoteHost, "open", open_remote)
    monkeypatch.setattr(agent_host, "host_facts", facts)
    monkeypatch.setattr(agent_host, "install_version", install_version)
    for name in ("switch_current", "start_service", "prune_versions"):
        monkeypatch.setattr(agent_host, name, on_host)
    monkeypatch.setattr(deploy.Deployment, "wheels_for", wheels)

    class View:
        def __init__(self, _client: Any) -> None:
            pass

        async def drain_and_wait(self, name: str, _timeout: float) -> None:
            await seen.step("drain", name)

        async def wait_connected(self, name: str, _version: str, _timeout: float) -> None:
            await seen.step("connected", name)

        async def undrain(self, name: str) -> None:
            await seen.step("undrain", name)

    monkeypatch.setattr(deploy, "CoordinatorView", View)
    return seen


def _upgrade(parallel: int, max_unavailable: int) -> list[HostResult]:
    inventory = Inventory(Path("inventory.toml"), "10.0.0.5:7600", "token", tuple(HOSTS))
    options = DeployOptions(Path("known"), parallel=parallel, max_unavailable=max_unavailable)
    return asyncio.run(run_deploy("upgrade", inventory, None, options, list(HOSTS)))  # type: ignore[arg-type]


def test_installs_run_parallel_hosts_at_once_and_the_roll_max_unavailable(
    recorder: Recorder,
) -> None:
    results = _upgrade(parallel=3, max_unavailable=1)
    assert [(r.host, r.before, r.after, r.error) for r in results] == [
        (h.name, "0.1.0", "0.1.1", "") for h in HOSTS
    ]
    assert recorder.most["install"] == 3  # all three installed beside at once
    assert recorder.most["drain"] == 1  # one host out of service at a time
    installs = [i for i, e in enumerate(recorder.events) if e.startswith("install")]
    drains = [i for i, e in enumerate(recorder.events) if e.startswith("drain")]
    assert max(installs) < min(drains)  # every host has the new version before any drains
    # each host is undrained before the next one drains
    order = [e for e in recorder.events if e.split()[0] in ("drain", "undrain")]
    assert order == [f"{kind} {h.name}" for h in HOSTS for kind in ("drain", "undrain")]


def test_a_host_where_the_new_version_does_not_install_stops_the_rollout_before_any_drain(
    recorder: Recorder,
) -> None:
    recorder.broken = "h2"  # type: ignore[attr-defined]
    results = {r.host: r.error for r in _upgrade(parallel=2, max_unavailable=2)}
    assert results["h2"] == "h2: pip failed"
    assert (
        results["h1"]
        == results["h3"]
        == ("not attempted: the new version did not install on every host")
    )
    assert not any(e.startswith(("drain", "undrain", "host-step")) for e in recorder.events)


def test_upgrade_takes_parallel_as_well_as_max_unavailable() -> None:
    args = build_parser().parse_args(
        ["deploy", "upgrade", "i.toml", "--parallel", "8", "--max-unavailable", "2"]
    )
    assert (args.parallel, args.max_unavailable) == (8, 2)

"""`polyarch deploy` against real sshd hosts (containers with their own addresses and files):
install, a 3-platform build through the installed agents, upgrades (one that works under a
running build, one that does not start and rolls back), status, uninstall, bad hosts."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.agent_containers import Fleet, running_fleet, wait_for
from tests.support.ssh_hosts import SshHost, running_ssh_hosts
from tests.support.verify import docker_run_uname, index_platforms, skopeo_raw

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "hello"
PLATFORMS = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
DEPLOY_TIMEOUT = 600.0

pytestmark = pytest.mark.emulated


@dataclass
class Site:
    """A coordinator, two SSH hosts and the inventory that names them."""

    fleet: Fleet
    hosts: list[SshHost]
    inventory: Path
    known_hosts: Path
    work: Path

    def deploy(
        self, *args: str, timeout: float = DEPLOY_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        action, *rest = args
        return self.fleet.cli("deploy", action, str(self.inventory), "--known-hosts",
                              str(self.known_hosts), *rest, timeout=timeout)  # fmt: skip

    def connected(self) -> dict[str, str]:
        """name -> version of every connected agent, from the coordinator's listing."""
        return {a["name"]: a.get("version", "") for a in self.fleet.agents_json()
                if a.get("state") in ("ready", "draining")}  # fmt: skip


def inventory_text(fleet: Fleet, hosts: list[SshHost], key: Path, extra: str = "") -> str:
    lines = [
        "[coordinator]", f'address = "{fleet.address}"', 'token_file = "agent.token"', "",
        "[defaults]", 'user = "root"', f'key = "{key}"', 'builder = "docker"',
        'docker_binary = "/usr/bin/docker"', "slots = 2", "",
    ]  # fmt: skip
    for host in hosts:
        lines += ["[[hosts]]", f'name = "{host.name}"', f'address = "{host.address}"',
                  'native = ["linux/amd64"]', 'emulated = ["linux/arm64", "linux/arm/v7"]', ""]  # fmt: skip
    return "\n".join(lines) + extra


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with running_fleet(tmp_path / "fleet") as fleet:
        with running_ssh_hosts(tmp_path / "ssh", fleet.network.name, ["arm-1", "x86-1"]) as (
            hosts, key,
        ):  # fmt: skip
            work = tmp_path / "ops"
            work.mkdir()
            (work / "agent.token").write_text(fleet.enrolment_token() + "\n")
            inventory = work / "inventory.toml"
            inventory.write_text(inventory_text(fleet, hosts, key))
            known = work / "known_hosts"
            known.write_text("".join(h.known_hosts_line() + "\n" for h in hosts))
            yield Site(fleet, hosts, inventory, known, work)


def source_with_version(dest: Path, version: str, broken: bool = False) -> Path:
    """A copy of this source tree whose wheel is `version`; `broken`: its agent exits at once."""
    for top in ("pyproject.toml", "README.md", "agent", "client", "coordinator", "ops", "proto"):
        source = REPO / top
        if source.is_dir():
            shutil.copytree(source, dest / top, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / top)
    pyproject = dest / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace('version = "0.1.0"', f'version = "{version}"', 1)
    )
    if broken:
        cli = dest / "client" / "cli.py"
        cli.write_text(cli.read_text().replace(
            "def cmd_agent(args: argparse.Namespace, session: _Session) -> int:\n",
            "def cmd_agent(args: argparse.Namespace, session: _Session) -> int:\n"
            "    raise SystemExit('this agent is broken on purpose')\n",
        ))  # fmt: skip
    return dest


def test_install_build_upgrade_and_uninstall_on_two_ssh_hosts(
    site: Site, registry, base_image: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    done = site.deploy("install")
    install_seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr + site.fleet.diagnostics()
    assert site.connected() == {"arm-1": "0.1.0", "x86-1": "0.1.0"}
    for host in site.hosts:  # what a host holds, seen from inside it (not through deploy)
        listing = host.exec(f"stat -c '%a %n' /etc/polyarch/agent-{host.name}.env "
                            f"/etc/polyarch/agent-{host.name}.toml; readlink /opt/polyarch/current")  # fmt: skip
        assert listing.stdout.split("\n")[:3] == [
            f"600 /etc/polyarch/agent-{host.name}.env",
            f"600 /etc/polyarch/agent-{host.name}.toml",
            "0.1.0",
        ], listing
    print(f"install of 2 hosts: {install_seconds:.1f}s")

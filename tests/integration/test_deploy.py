"""`polyarch deploy` against real sshd hosts (containers with their own addresses and files):
install, a 3-platform build through the installed agents, upgrades (one that works under a
running build, one that does not start and rolls back), status, uninstall, bad hosts."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.agent_containers import Fleet, running_fleet, wait_for
from tests.support.polyarch_versions import source_with_version
from tests.support.ssh_hosts import SshHost, running_ssh_hosts, ssh_keygen
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
                  'native = ["linux/amd64"]', f"emulated = {json.dumps(PLATFORMS[1:])}",
                  ""]  # fmt: skip
    return "\n".join(lines) + extra


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with (
        running_fleet(tmp_path / "fleet") as fleet,
        running_ssh_hosts(tmp_path / "ssh", fleet.network.name, ["arm-1", "x86-1"]) as (hosts, key),
    ):
        work = tmp_path / "ops"
        work.mkdir()
        (work / "agent.token").write_text(fleet.enrolment_token() + "\n")
        inventory = work / "inventory.toml"
        inventory.write_text(inventory_text(fleet, hosts, key))
        known = work / "known_hosts"
        known.write_text("".join(h.known_hosts_line() + "\n" for h in hosts))
        yield Site(fleet, hosts, inventory, known, work)


def deployed_versions(site: Site) -> dict[str, str]:
    """What /opt/polyarch/current names on each host, seen from inside it."""
    return {h.name: h.exec("readlink /opt/polyarch/current").stdout.strip() for h in site.hosts}


def install(site: Site) -> float:
    started = time.monotonic()
    done = site.deploy("install")
    assert done.returncode == 0, done.stdout + done.stderr + site.fleet.diagnostics()
    assert site.connected() == {"arm-1": "0.1.0", "x86-1": "0.1.0"}
    return time.monotonic() - started


def test_installed_agents_connect_and_build_the_three_platform_example(
    site: Site, registry, base_image: str, docker_binary: str, tmp_path: Path
) -> None:
    dry = site.deploy("install", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "install (dry run: " in dry.stdout
    assert all(h.exec("ls -d /opt/polyarch /etc/polyarch").stdout == "" for h in site.hosts)
    assert site.connected() == {}  # a dry run changes nothing
    seconds = install(site)
    print(f"\ninstall of 2 hosts: {seconds:.1f}s")
    for host in site.hosts:  # what a host holds, seen from inside it (not through deploy)
        etc, state = f"/etc/polyarch/agent-{host.name}", f"/var/lib/polyarch/agent-{host.name}"
        listing = host.exec(f"stat -c '%a %n' {etc}.env {etc}.toml {state}")
        assert listing.stdout.split("\n")[:3] == [
            f"600 /etc/polyarch/agent-{host.name}.env",
            f"600 /etc/polyarch/agent-{host.name}.toml",
            f"700 /var/lib/polyarch/agent-{host.name}",
        ], listing
        token = site.work.joinpath("agent.token").read_text().strip()
        assert token not in host.exec(f"cat /var/log/polyarch/agent-{host.name}.log").stdout
    status = site.deploy("status", "--json")
    assert status.returncode == 0, status.stderr
    rows = {row["name"]: row for row in json.loads(status.stdout)}
    for name in ("arm-1", "x86-1"):  # containers see no binfmt_misc: qemu is []
        assert rows[name] == {"host": name, "name": name, "service": "supervised",
                              "version": "0.1.0", "connected": True, "error": "",
                              "qemu": []}  # fmt: skip
    print(site.deploy("status").stdout)

    repo = f"{registry.address}/deploy-{tmp_path.name[-12:].lower()}"
    metadata = tmp_path / "metadata.json"
    built = site.fleet.cli(
        "build", "--platform", ",".join(PLATFORMS), "-t", f"{repo}:1",
        "--build-arg", f"BASE={base_image}", "--metadata-file", str(metadata), str(EXAMPLE),
        timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr + site.fleet.diagnostics()
    assert sorted(index_platforms(skopeo_raw(f"{repo}:1"))) == sorted(PLATFORMS)
    agents = {r["agent"] for r in json.loads(metadata.read_text())["polyarch.platforms"].values()}
    assert agents <= {"arm-1", "x86-1"}
    assert docker_run_uname(docker_binary, f"{repo}:1", "linux/arm64") == "aarch64"


def test_a_rolling_upgrade_under_a_running_build_keeps_it_and_ends_on_the_new_version(
    site: Site, registry, base_image: str, tmp_path: Path
) -> None:
    install(site)
    newer = source_with_version(tmp_path / "v2", "0.1.1")
    build = site.fleet.popen_cli(
        "build", "--platform", "linux/amd64,linux/arm64", "-t", f"{registry.address}/deploy-up:1",
        "--build-arg", f"BASE={base_image}", "--build-arg", "ITERATIONS=3000000",
        "--build-arg", f"BUILD_ID={secrets.token_hex(8)}", str(EXAMPLE),
    )  # fmt: skip
    try:
        build_id = wait_for(lambda: _submitted(site), timeout=60, message="no build submitted")
        # the emulated platform runs longest: the upgrade starts while it runs
        wait_for(lambda: site.fleet.running_job(build_id, "linux/arm64"), timeout=120,
                 message="the build never ran")  # fmt: skip
        started = time.monotonic()
        done = site.deploy("upgrade", "--project", str(newer))
        seconds = time.monotonic() - started
        assert done.returncode == 0, done.stdout + done.stderr + site.fleet.diagnostics()
        print(f"\nrolling upgrade of 2 hosts: {seconds:.1f}s\n{done.stdout}")
        _, err = build.communicate(timeout=600)
        assert build.returncode == 0, err  # drained, not killed: the build finished
    finally:
        if build.poll() is None:
            build.kill()
        build.communicate()  # reaps it and closes its pipes
    assert site.connected() == {"arm-1": "0.1.1", "x86-1": "0.1.1"}
    assert deployed_versions(site) == {"arm-1": "0.1.1", "x86-1": "0.1.1"}
    for host in site.hosts:  # the previous version stays for a rollback
        assert host.exec("ls /opt/polyarch").stdout.split() == [
            "0.1.0",
            "0.1.1",
            "current",
            "polyarch-supervise",
        ]


def _submitted(site: Site) -> str | None:
    builds = site.fleet.builds_json()
    return str(builds[0]["id"]) if builds else None


def test_an_upgrade_that_does_not_start_rolls_back_and_stops_the_rollout(
    site: Site, tmp_path: Path
) -> None:
    install(site)
    broken = source_with_version(tmp_path / "broken", "0.1.2", broken=True)
    done = site.deploy("upgrade", "--project", str(broken), "--start-timeout", "15")
    assert done.returncode == 1, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    first, second = (rows[h.name] for h in site.hosts)
    assert "not connected with version 0.1.2" in first and "rolled back to 0.1.0" in first
    assert "not attempted: the rollout stopped" in second
    assert "1 of 2 hosts failed" not in done.stderr  # both rows are failures: 2 of 2
    assert site.connected() == {"arm-1": "0.1.0", "x86-1": "0.1.0"}
    assert deployed_versions(site) == {"arm-1": "0.1.0", "x86-1": "0.1.0"}
    ready = {a["name"]: a["state"] for a in site.fleet.agents_json()}
    assert ready == {"arm-1": "ready", "x86-1": "ready"}  # undrained after the rollback


def test_uninstall_leaves_no_process_service_or_file(site: Site) -> None:
    install(site)
    done = site.deploy("uninstall")
    assert done.returncode == 0, done.stdout + done.stderr
    for host in site.hosts:
        left = host.exec(
            "ls -d /opt/polyarch /etc/polyarch /var/lib/polyarch /var/log/polyarch "
            "/run/polyarch 2>/dev/null; ps -eo args= | grep -E 'polyarch' | grep -v grep; true"
        )
        assert left.stdout.strip() == "", f"{host.name} keeps: {left.stdout}"
    assert site.fleet.agents_json() == []


def test_an_unreachable_host_and_a_wrong_host_key_fail_alone(site: Site, tmp_path: Path) -> None:
    good, changed = site.hosts
    (tmp_path / "impostor").mkdir()
    impostor = ssh_keygen(tmp_path / "impostor" / "key")
    site.known_hosts.write_text(
        f"{good.known_hosts_line()}\n{changed.address} {' '.join(impostor.split()[:2])}\n"
    )
    site.inventory.write_text(site.inventory.read_text() + "\n".join([
        "[[hosts]]", 'name = "ghost"', 'address = "127.0.0.1"', "port = 1", "",
    ]))  # fmt: skip
    done = site.deploy("install", "--ssh-timeout", "5")
    assert done.returncode == 1, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert "does not match" in rows["x86-1"] and "refusing to connect" in rows["x86-1"]
    assert "ghost" in rows and "cannot connect" in rows["ghost"]
    assert "yes" in rows["arm-1"].split()  # the good host is done and connected
    assert "2 of 3 hosts failed: x86-1, ghost" in done.stderr
    assert site.connected() == {"arm-1": "0.1.0"}

    # --with-qemu where binfmt_misc cannot be mounted (an unprivileged container): that host
    # fails with the reason before anything changes on it (the systemd test shows success)
    qemu = site.deploy("install", "--with-qemu", "--hosts", "arm-1")
    assert qemu.returncode == 1, qemu.stdout + qemu.stderr
    assert "binfmt_misc is not mounted" in qemu.stdout and "mounting it failed" in qemu.stdout
    assert site.connected() == {"arm-1": "0.1.0"}  # the running agent was left alone

    # a host not in known_hosts is refused unless asked, then recorded
    site.known_hosts.write_text("")
    site.inventory.write_text(
        inventory_text(site.fleet, site.hosts, site.work.parent / "ssh" / "id_ed25519")
    )
    refused = site.deploy("status", "--json")
    assert refused.returncode == 1
    assert all("is not in" in row["error"] for row in json.loads(refused.stdout))
    accepted = site.deploy("status", "--json", "--accept-new-host-keys")
    assert [row["error"] for row in json.loads(accepted.stdout)] == ["", ""], accepted.stdout
    recorded = sorted(site.known_hosts.read_text().splitlines())  # in the order hosts answered
    assert recorded == sorted(h.known_hosts_line() for h in site.hosts)

"""`polyarch deploy` on a host that runs systemd as PID 1 (a QEMU-booted Debian machine):
install with `--with-qemu` registers the host's packaged QEMU handlers, the agent runs as a
systemd unit logging to journald and builds an emulated platform with buildah; an upgrade
restarts the unit on the new version; uninstall leaves no unit, file, process or enrolment."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.agent_containers import Fleet, running_fleet, wait_for
from tests.support.polyarch_versions import source_with_version
from tests.support.systemd_host import SystemdHost, running_systemd_host
from tests.support.verify import docker_run_uname, index_platforms, skopeo_raw

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "hello"
NAME = "sd-1"
UNIT = f"polyarch-agent@{NAME}.service"
# software emulation of the whole host: its agent starts slower than on a real machine
START_TIMEOUT = "240"

pytestmark = pytest.mark.emulated


def _inventory(fleet: Fleet, host: SystemdHost, work: Path) -> Path:
    (work / "agent.token").write_text(fleet.enrolment_token() + "\n")
    inventory = work / "inventory.toml"
    inventory.write_text("\n".join([
        "[coordinator]", f'address = "{fleet.address}"', 'token_file = "agent.token"', "",
        "[defaults]", 'user = "root"', f'key = "{host.client_key}"', 'builder = "buildah"',
        "slots = 1", "",
        # no native/emulated: the agent detects both, emulation from the handlers deploy adds
        "[[hosts]]", f'name = "{NAME}"', f'address = "{host.address}"', f"port = {host.port}",
        "",
    ]))  # fmt: skip
    return inventory


def _deploy(fleet: Fleet, inventory: Path, host: SystemdHost, *args: str):
    action, *rest = args
    return fleet.cli("deploy", action, str(inventory), "--known-hosts", str(host.known_hosts),
                     *rest, timeout=900)  # fmt: skip


def _on_host(host: SystemdHost, command: str) -> str:
    done = host.exec(command)
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    return done.stdout.strip()


def _agent(fleet: Fleet) -> dict[str, object] | None:
    return next((a for a in fleet.agents_json() if a["name"] == NAME), None)


def test_a_systemd_host_gets_qemu_a_unit_an_upgrade_and_a_clean_removal(
    registry, base_image: str, docker_binary: str, tmp_path: Path
) -> None:
    registry_port = int(registry.address.rpartition(":")[2])
    with (
        running_fleet(tmp_path / "fleet") as fleet,
        running_systemd_host(tmp_path / "vm", NAME, forwards=[registry_port]) as host,
    ):
        work = tmp_path / "ops"
        work.mkdir()
        inventory = _inventory(fleet, host, work)
        # before: systemd is PID 1, and the host has QEMU's packages but no handler registered
        assert _on_host(host, "ps -o comm= -p 1") == "systemd"
        assert _on_host(host, "ls /proc/sys/fs/binfmt_misc") == "register\nstatus"
        assert _on_host(host, "dpkg-query -W -f '${Status}' qemu-user-static").endswith("installed")

        started = time.monotonic()
        done = _deploy(fleet, inventory, host, "install", "--with-qemu",
                       "--start-timeout", START_TIMEOUT)  # fmt: skip
        install_seconds = time.monotonic() - started
        assert done.returncode == 0, done.stdout + done.stderr + fleet.diagnostics()
        print(f"\ninstall on the systemd host: {install_seconds:.1f}s\n{done.stdout}")
        row = done.stdout.splitlines()[1].split()
        assert row[:5] == [NAME, "install", "-", "0.1.0", "systemd"], done.stdout
        assert (
            f"{NAME}: QEMU handlers from binfmt-support (enabled at boot): "
            "linux/arm64 (qemu-aarch64), linux/arm/v7 linux/arm/v6 (qemu-arm)"
        ) in done.stdout

        # the host's own view (OpenSSH, not deploy): handlers, persistence, the unit, journald
        assert _on_host(host, "head -n 1 /proc/sys/fs/binfmt_misc/qemu-aarch64") == "enabled"
        assert "F" in _on_host(host, "sed -n 's/^flags: //p' /proc/sys/fs/binfmt_misc/qemu-arm")
        assert _on_host(host, "systemctl is-enabled binfmt-support.service") == "enabled"
        assert _on_host(host, f"systemctl is-active {UNIT}; systemctl is-enabled {UNIT}") == (
            "active\nenabled"
        )
        journal = _on_host(host, f"journalctl -u {UNIT} --no-pager -o cat")
        assert "polyarch" in journal.lower(), journal
        assert fleet.enrolment_token() not in journal
        assert host.exec(f"test -e /var/log/polyarch/agent-{NAME}.log").returncode == 1
        # the coordinator's view: native amd64, arm64 and arm/v7 through the new handlers
        agent = _agent(fleet)
        assert agent is not None and agent["state"] == "ready", fleet.agents_json()
        assert agent["native_platforms"] == ["linux/amd64"]
        assert {"linux/arm64", "linux/arm/v7"} <= set(agent["emulated_platforms"])  # type: ignore[arg-type]

        status = _deploy(fleet, inventory, host, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        [row_json] = json.loads(status.stdout)
        assert row_json["service"] == "systemd" and row_json["connected"] is True
        assert {"linux/arm64", "linux/arm/v7"} <= set(row_json["qemu"])

        # a real build on that host: native amd64 and arm64 under the handlers deploy added
        repo = f"{registry.address}/deploy-systemd-{tmp_path.name[-8:].lower()}"
        built = fleet.cli(
            "build", "--platform", "linux/amd64,linux/arm64", "-t", f"{repo}:1",
            "--build-arg", f"BASE={base_image}", str(EXAMPLE), timeout=900,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr + fleet.diagnostics()
        assert sorted(index_platforms(skopeo_raw(f"{repo}:1"))) == ["linux/amd64", "linux/arm64"]
        assert docker_run_uname(docker_binary, f"{repo}:1", "linux/arm64") == "aarch64"

        # upgrade: the unit restarts on the new version, the old one is kept for a rollback
        newer = source_with_version(tmp_path / "v2", "0.1.1")
        pid_before = _on_host(host, f"systemctl show -p MainPID --value {UNIT}")
        started = time.monotonic()
        upgraded = _deploy(fleet, inventory, host, "upgrade", "--project", str(newer),
                           "--start-timeout", START_TIMEOUT)  # fmt: skip
        print(f"upgrade on the systemd host: {time.monotonic() - started:.1f}s")
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr + fleet.diagnostics()
        assert _on_host(host, "readlink /opt/polyarch/current") == "0.1.1"
        assert _on_host(host, f"systemctl show -p MainPID --value {UNIT}") != pid_before
        assert _on_host(host, f"systemctl is-active {UNIT}") == "active"
        agent = _agent(fleet)
        assert agent is not None and agent["version"] == "0.1.1" and agent["state"] == "ready"

        # uninstall: no unit, file, process or enrolment left
        removed = _deploy(fleet, inventory, host, "uninstall")
        assert removed.returncode == 0, removed.stdout + removed.stderr
        leftovers = _on_host(
            host,
            "systemctl list-units --all --no-legend 'polyarch*'; "
            "systemctl list-unit-files --no-legend 'polyarch*'; "
            "ls -d /opt/polyarch /etc/polyarch /var/lib/polyarch /var/log/polyarch "
            "/run/polyarch /etc/systemd/system/polyarch-agent@.service 2>/dev/null; "
            "ps -eo args= | grep -E 'polyarch' | grep -v grep; true",
        )
        assert leftovers == "", leftovers
        wait_for(lambda: _agent(fleet) is None, timeout=30, message="the agent left the fleet")

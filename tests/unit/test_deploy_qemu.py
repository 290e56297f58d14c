"""`deploy install --with-qemu`: the registration script on fake binfmt folders, its report,
the coverage check, which hosts register, and what install and status print."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from polyarch.client.cli import build_parser
from polyarch.ops import agent_host, deploy, deploy_cli
from polyarch.ops.agent_host import HostFacts
from polyarch.ops.deploy import Deployment, DeployOptions, HostResult
from polyarch.ops.inventory import Host, InventoryError, load_inventory
from polyarch.ops.qemu import (
    BinfmtPaths,
    QemuReport,
    check_coverage,
    parse_report,
    register_qemu,
    registers_qemu,
    script_command,
    summary_lines,
)
from polyarch.ops.ssh import Completed, HostError, RemoteHost

AARCH64_LINE = r":qemu-aarch64:M::\x7fELF\x02\x01:\xff\xff\xff:/usr/bin/qemu-aarch64-static:F"
# what the script needs besides the fakes: never the machine's own update-binfmts or mount
TOOLS = ("sh", "head", "sed", "grep", "cut", "touch")
ENABLE = """case "$1" in
--import) [ "$2" = qemu-arm ] && { echo "update-binfmts: qemu-arm already imported" >&2; exit 2; };;
--enable) case "$2" in qemu-arm) f=OC;; *) f=POCF;; esac
    printf 'enabled\\ninterpreter /usr/libexec/qemu-binfmt/%s\\nflags: %s\\n' "$2" "$f" \\
        > "$BINFMT/$2";;
esac
exit 0
"""


@dataclass
class FakeHost:
    """Temporary folders standing in for a host's binfmt_misc, packages and tools."""

    root: Path
    paths: BinfmtPaths
    bin: Path

    def command(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f'#!/bin/sh\necho "$*" >> {self.root}/{name}.log\n{body}')
        path.chmod(0o755)

    def calls(self, name: str) -> list[str]:
        log = self.root / f"{name}.log"
        return log.read_text().splitlines() if log.exists() else []

    def run(self, mode: str = "register") -> subprocess.CompletedProcess[str]:
        assert self.paths.binfmt.startswith(str(self.root))  # never the machine's binfmt_misc
        return subprocess.run(
            ["/bin/sh", "-c", script_command("arm-1", mode, self.paths)],
            env={"PATH": str(self.bin), "BINFMT": self.paths.binfmt},
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    paths = BinfmtPaths(*(str(tmp_path / d) for d in ("binfmt_misc", "binfmts", "binfmt.d", "sd")))
    for folder in (paths.binfmt, paths.imports, paths.binfmt_d, paths.systemd):
        os.mkdir(folder)
    Path(paths.binfmt, "register").touch()
    Path(paths.binfmt, "status").write_text("enabled\n")
    fake = FakeHost(tmp_path, paths, tmp_path / "bin")
    fake.bin.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found is not None
        (fake.bin / tool).symlink_to(found)
    fake.command("id", "echo 0\n")
    fake.command("uname", "echo x86_64\n")
    fake.command("systemctl", "")
    fake.command("mount", 'echo "mount: $4: permission denied." >&2; exit 32\n')
    return fake


def test_binfmt_support_imports_and_enables_each_format_and_enables_its_service_at_boot(
    host: FakeHost,
) -> None:
    for name in ("qemu-aarch64", "qemu-arm", "qemu-mips"):
        Path(host.paths.imports, name).write_text("package qemu-user-static\n")
    Path(host.paths.binfmt_d, "qemu-aarch64.conf").write_text(AARCH64_LINE + "\n")
    host.command("update-binfmts", ENABLE)
    done = host.run()
    assert done.returncode == 0, done.stderr
    assert host.calls("update-binfmts") == [
        f"--{action} {name}"
        for name in ("qemu-aarch64", "qemu-arm", "qemu-mips")
        for action in ("import", "enable")
    ]  # "already imported" is no failure
    assert host.calls("systemctl") == ["enable binfmt-support.service"]
    assert Path(host.paths.binfmt, "register").read_text() == ""  # binfmt.d is not used
    report = parse_report("arm-1", done.stdout)
    assert (report.source, report.boot, report.machine) == (
        "binfmt-support", "enabled at boot", "x86_64",
    )  # fmt: skip
    assert [(h.name, h.enabled, h.flags) for h in report.handlers] == [
        ("qemu-aarch64", True, "POCF"), ("qemu-arm", True, "OC"), ("qemu-mips", True, "POCF"),
    ]  # fmt: skip
    assert report.platforms == ["linux/arm/v6", "linux/arm/v7", "linux/arm64"]
    assert summary_lines("arm-1", report) == [
        "arm-1: QEMU handlers from binfmt-support (enabled at boot): linux/arm64 "
        "(qemu-aarch64), linux/arm/v7 linux/arm/v6 (qemu-arm); 1 other handlers",
        "arm-1: warning: handlers without the F flag (builds inside containers or chroots "
        "need the interpreter fixed at registration): qemu-arm",
    ]


def test_binfmt_d_files_register_their_line_or_enable_the_handler_already_there(
    host: FakeHost,
) -> None:
    conf = Path(host.paths.binfmt_d)
    (conf / "qemu-aarch64-static.conf").write_text(f"# QEMU\n; for aarch64\n\n{AARCH64_LINE}\n")
    (conf / "qemu-arm-static.conf").write_text(":qemu-arm:M::\\x7fELF:\\xff:/usr/bin/q:F\n")
    (conf / "qemu-riscv64.conf").write_text("# nothing here\n")
    Path(host.paths.binfmt, "qemu-arm").write_text("disabled\ninterpreter /usr/bin/q\nflags: F\n")
    register = Path(host.paths.binfmt, "register")
    register.unlink()
    os.mkfifo(register)  # collects every write, as the kernel takes each one
    reader = os.open(register, os.O_RDWR | os.O_NONBLOCK)
    try:
        done = host.run()
        written = os.read(reader, 65536).decode()
    finally:
        os.close(reader)
    assert done.returncode == 0, done.stderr
    assert written == AARCH64_LINE + "\n"  # backslashes as they are: the kernel reads them
    assert Path(host.paths.binfmt, "qemu-arm").read_text() == "1\n"
    report = parse_report("arm-1", done.stdout)
    assert (report.source, report.boot) == ("binfmt.d", "loaded at boot by systemd-binfmt")
    assert report.notes == (f"{conf}/qemu-riscv64.conf holds no registration line",)
    assert host.calls("update-binfmts") == host.calls("mount") == []


def test_without_systemd_nothing_is_enabled_at_boot(host: FakeHost) -> None:
    os.rmdir(host.paths.systemd)
    Path(host.paths.imports, "qemu-aarch64").write_text("package qemu-user-static\n")
    host.command("update-binfmts", ENABLE)
    done = host.run()
    assert done.returncode == 0, done.stderr
    assert parse_report("arm-1", done.stdout).boot == "not at boot: no systemd"
    assert host.calls("systemctl") == []


def test_an_unmounted_binfmt_misc_is_mounted_and_a_refusal_is_named(host: FakeHost) -> None:
    Path(host.paths.binfmt, "register").unlink()
    refused = host.run()
    assert refused.returncode == 1
    assert "arm-1: binfmt_misc is not mounted on" in refused.stderr
    assert "permission denied" in refused.stderr
    assert host.calls("mount") == [f"-t binfmt_misc binfmt_misc {host.paths.binfmt}"]
    host.command("mount", 'touch "$4/register"\n')  # mounted: the kernel's files appear
    Path(host.paths.binfmt_d, "qemu-arm.conf").write_text(":qemu-arm:M::\\x7fELF:\\xff:/q:F\n")
    assert host.run().returncode == 0


def test_registering_needs_root_and_packaged_handlers(host: FakeHost) -> None:
    nothing = host.run()
    assert nothing.returncode == 1
    assert nothing.stderr.strip() == (
        "no QEMU binfmt handlers among arm-1's packages: install qemu-user-static "
        "(Debian/Ubuntu) or qemu-user-static / qemu-user-binfmt (Fedora)"
    )
    host.command("id", "echo 1000\n")
    Path(host.paths.binfmt_d, "qemu-arm.conf").write_text(":qemu-arm:M::\\x7fELF:\\xff:/q:F\n")
    user = host.run()
    assert user.returncode == 1
    assert user.stderr.strip() == "registering QEMU handlers needs root on arm-1"
    assert Path(host.paths.binfmt, "register").read_text() == ""


def test_reading_changes_nothing_and_reports_what_is_enabled(host: FakeHost) -> None:
    binfmt = Path(host.paths.binfmt)
    (binfmt / "qemu-aarch64").write_text("enabled\ninterpreter /q\nflags: POCF\noffset 0\n")
    (binfmt / "qemu-s390x").write_text("disabled\ninterpreter /q\nflags: F\n")
    host.command("id", "echo 1000\n")  # no root needed to read
    done = host.run("read")
    assert done.returncode == 0, done.stderr
    report = parse_report("arm-1", done.stdout)
    assert (report.source, report.platforms) == ("", ["linux/arm64"])
    (binfmt / "register").unlink()  # not mounted: nothing to report, and nothing mounted
    absent = parse_report("arm-1", host.run("read").stdout)
    assert (absent.status, absent.platforms, host.calls("mount")) == ("absent", [], [])


def report_of(machine: str, *handlers: str, status: str = "enabled") -> QemuReport:
    lines = [f"machine\t{machine}", f"status\t{status}", "source\tbinfmt.d", "boot\tb"]
    lines += [f"handler\t{h}\tenabled\tF" for h in handlers]
    return parse_report("x86-1", "\n".join(lines) + "\n")


def test_platforms_leave_out_the_native_one_and_a_disabled_binfmt_misc_gives_none() -> None:
    arm = report_of("aarch64", "qemu-aarch64", "qemu-x86_64", "qemu-mips")
    assert arm.platforms == ["linux/amd64"]
    assert summary_lines("a", arm)[0].endswith(": linux/amd64 (qemu-x86_64); 2 other handlers")
    assert report_of("x86_64", "qemu-aarch64", status="disabled").platforms == []
    with pytest.raises(HostError, match="x86-1: unexpected report of QEMU handlers"):
        parse_report("x86-1", "sh: 1: syntax error\n")


def test_emulated_platforms_of_the_inventory_must_each_have_an_enabled_handler() -> None:
    report = report_of("x86_64", "qemu-aarch64", "qemu-arm")
    check_coverage(Host("x86-1", "h", emulated=("linux/arm64", "linux/arm/v6")), report)
    check_coverage(Host("x86-1", "h", emulated=("linux/amd64",)), report)  # native
    with pytest.raises(HostError) as uncovered:
        check_coverage(Host("x86-1", "h", emulated=("linux/arm64", "linux/s390x")), report)
    assert str(uncovered.value) == (
        "x86-1: emulated linux/s390x not covered by an enabled QEMU handler; registered: "
        "linux/arm64 (qemu-aarch64), linux/arm/v7 linux/arm/v6 (qemu-arm); 0 other handlers"
    )


class CannedRemote:
    def __init__(self, host: Host, stdout: str) -> None:
        self.host, self.stdout, self.commands = host, stdout, list[str]()

    async def run(self, command: str, *, step: str, check: bool = True) -> Completed:
        self.commands.append(command)
        return Completed(0, self.stdout, "")


def test_registration_that_enables_nothing_or_too_little_fails_naming_the_host() -> None:
    host = Host("x86-1", "h", emulated=("linux/s390x",))
    none = "machine\tx86_64\nstatus\tenabled\nsource\tbinfmt.d\nwarning\twriting r: denied\n"
    with pytest.raises(HostError, match=r"x86-1: no QEMU handler enabled from binfmt\.d: writing"):
        asyncio.run(register_qemu(cast(RemoteHost, CannedRemote(host, none))))
    arm = CannedRemote(host, none + "handler\tqemu-aarch64\tenabled\tF\n")
    with pytest.raises(HostError, match="emulated linux/s390x not covered"):
        asyncio.run(register_qemu(cast(RemoteHost, arm)))
    assert "/proc/sys/fs/binfmt_misc" in arm.commands[0] and " register " in arm.commands[0]


INVENTORY = """[coordinator]
address = "10.0.0.5:7600"
token = "pa_agent_secret"
[defaults]
{default}
[[hosts]]
name = "unset"
address = "10.0.0.1"
[[hosts]]
name = "yes"
address = "10.0.0.2"
with_qemu = true
[[hosts]]
name = "no"
address = "10.0.0.3"
with_qemu = false
"""


@pytest.mark.parametrize(
    ("default", "flag", "registering"),
    [
        ("", False, ["yes"]),
        ("", True, ["unset", "yes"]),  # with_qemu = false keeps a host out of the flag
        ("with_qemu = true", False, ["unset", "yes"]),
        ("with_qemu = false", True, ["yes"]),
    ],
)
def test_a_host_registers_when_its_with_qemu_says_so_else_when_the_flag_does(
    tmp_path: Path, default: str, flag: bool, registering: list[str]
) -> None:
    path = tmp_path / "inventory.toml"
    path.write_text(INVENTORY.format(default=default))
    hosts = load_inventory(path).hosts
    assert [h.name for h in hosts if registers_qemu(h, flag)] == registering


def test_with_qemu_must_be_a_boolean(tmp_path: Path) -> None:
    path = tmp_path / "inventory.toml"
    path.write_text(INVENTORY.format(default="").replace("with_qemu = true", 'with_qemu = "yes"'))
    with pytest.raises(InventoryError, match=r"hosts\[1\]: with_qemu must be true or false"):
        load_inventory(path)
    parser = build_parser()
    assert parser.parse_args(["deploy", "install", "i.toml", "--with-qemu"]).with_qemu is True
    assert parser.parse_args(["deploy", "install", "i.toml"]).with_qemu is False
    with pytest.raises(SystemExit):
        parser.parse_args(["deploy", "upgrade", "i.toml", "--with-qemu"])


def test_install_registers_after_the_facts_and_before_the_agent_s_files_never_on_dry_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[str] = []

    def step(name: str, value: Any = None) -> Any:
        async def record(*_args: Any, **_kwargs: Any) -> Any:
            steps.append(name)
            return value

        return record

    facts = HostFacts("x86_64", "3.11", "2.36", "systemd", "")
    monkeypatch.setattr(agent_host, "host_facts", step("facts", facts))
    for name in ("install_version", "switch_current", "write_agent_files", "start_service",
                 "prune_versions"):  # fmt: skip
        monkeypatch.setattr(agent_host, name, step(name))
    monkeypatch.setattr(deploy, "register_qemu", step("register_qemu", report_of("x86_64")))
    monkeypatch.setattr(Deployment, "wheels_for", step("wheels", [Path("polyarch-1.2-x.whl")]))
    coordinator = type("View", (), {"wait_connected": step("connected")})()
    for dry_run in (True, False):
        inventory = load_inventory(_write(tmp_path, INVENTORY.format(default="")))
        options = DeployOptions(Path("known"), dry_run=dry_run, with_qemu=True)
        deployment = Deployment(inventory, coordinator, options)
        result = HostResult("unset", "install")
        remote = CannedRemote(inventory.hosts[0], "")
        steps.clear()
        asyncio.run(deployment.install(cast(RemoteHost, remote), result))
        if dry_run:
            assert "register_qemu" not in steps and result.qemu is None
            assert result.action.endswith("systemd, would register QEMU handlers)")
    assert steps.index("facts") < steps.index("register_qemu") < steps.index("write_agent_files")
    assert result.qemu is not None and result.qemu.source == "binfmt.d"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return path


def test_install_prints_a_line_per_registering_host_and_status_json_has_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registered = report_of("x86_64", "qemu-aarch64")
    results = [
        HostResult("yes", "install", qemu=registered),
        HostResult("unset", "install"),
        HostResult("no", "status", qemu=parse_report("no", "machine\tx86_64\nstatus\tabsent\n")),
    ]

    async def fake_run_deploy(*_args: Any) -> list[HostResult]:
        return results

    class NoClient:
        def __init__(self, *_args: Any, **_kwargs: Any) -> None:
            pass

        async def __aenter__(self) -> NoClient:
            return self

        async def __aexit__(self, *_exc: object) -> None:
            pass

    monkeypatch.setattr(deploy_cli, "run_deploy", fake_run_deploy)
    monkeypatch.setattr(deploy_cli, "BuildClient", NoClient)
    monkeypatch.setenv("POLYARCH_INSECURE", "1")
    path = _write(tmp_path, INVENTORY.format(default=""))
    install = build_parser().parse_args(["deploy", "install", str(path)])
    assert deploy_cli.run_deploy_command(install) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[4:] == [
        "yes: QEMU handlers from binfmt.d (b): linux/arm64 (qemu-aarch64); 0 other handlers"
    ]
    status = build_parser().parse_args(["deploy", "status", str(path), "--json"])
    assert deploy_cli.run_deploy_command(status) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["qemu"] for row in rows] == [["linux/arm64"], [], []]

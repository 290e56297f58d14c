"""deploy/systemd/: the units pass `systemd-analyze verify` and start polyarch with real flags."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polyarch.agent.config import agent_config_from
from polyarch.client.cli import build_parser
from polyarch.coordinator.config import config_from

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
INSTALLED_PATH = "/opt/polyarch/current/bin/polyarch"
UNITS = ("polyarch-coordinator.service", "polyarch-agent@.service")


def installed_polyarch() -> Path:
    """The polyarch this test runs under (the venv's console script)."""
    path = Path(sys.prefix) / "bin" / "polyarch"
    assert path.is_file(), f"no polyarch console script at {path}; run deploy/dev/bootstrap.sh"
    return path


def unit(name: str) -> configparser.RawConfigParser:
    """A unit file as sections of keys. Units repeat keys (After=), so the last one wins
    here; the tests only read keys that appear once."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((SYSTEMD / name).read_text(encoding="utf-8"))
    return parser


def exec_argv(name: str, instance: str = "arm-1") -> list[str]:
    """ExecStart as argv, with the template's %i filled in as systemd would."""
    return shlex.split(unit(name)["Service"]["ExecStart"].replace("%i", instance))


@pytest.fixture
def unit_copies(tmp_path: Path) -> Path:
    """The units, their program path pointing at the installed polyarch (verify checks that
    the program exists and is executable)."""
    program = str(installed_polyarch())
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        assert INSTALLED_PATH in text, f"{name} does not run {INSTALLED_PATH}"
        (tmp_path / name).write_text(text.replace(INSTALLED_PATH, program), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "target",
    [
        "polyarch-coordinator.service",
        "polyarch-agent@.service",  # verify instantiates a template itself
        "polyarch-agent@arm-1.service",  # an instance, loaded from the template beside it
    ],
)
def test_units_pass_systemd_analyze_verify_without_warnings(unit_copies: Path, target: str) -> None:
    binary = shutil.which("systemd-analyze")
    assert binary, "systemd-analyze missing: deploy/dev/bootstrap.sh installs the systemd package"
    # Run from the copies' folder with a relative path, so a same-named unit elsewhere on the
    # host cannot stand in. No output is filtered: on this machine (PID 1 not systemd) verify
    # prints nothing about the host, so any line on stderr is about our unit (an unknown key
    # is only a warning with exit 0, which is why stderr must be empty, not just the exit).
    result = subprocess.run(
        [binary, "verify", f"./{target}"],
        cwd=unit_copies,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert result.stdout == "", result.stdout


def test_verify_catches_a_broken_unit(unit_copies: Path) -> None:
    """The check above can fail: a misspelt key is reported on stderr."""
    path = unit_copies / "polyarch-coordinator.service"
    path.write_text(path.read_text().replace("PrivateTmp=", "PrivateTemp="), encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", "./polyarch-coordinator.service"],
        cwd=unit_copies, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "PrivateTemp" in result.stderr


def test_coordinator_unit_runs_its_data_dir_in_its_state_directory(tmp_path: Path) -> None:
    argv = exec_argv("polyarch-coordinator.service")
    assert argv[:2] == [INSTALLED_PATH, "coordinator"]
    args = build_parser().parse_args(argv[1:])
    assert args.config == Path("/etc/polyarch/coordinator.toml")
    # The example config, read by the real loader, in place of /etc/polyarch/coordinator.toml.
    args.config = SYSTEMD / "coordinator.toml.example"
    config = config_from(args)
    service = unit("polyarch-coordinator.service")["Service"]
    assert config.data_dir == Path("/var/lib") / service["StateDirectory"]
    assert service["DynamicUser"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    assert config.listen == "0.0.0.0:7600"


def test_agent_unit_takes_name_work_dir_and_token_from_its_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("POLYARCH_COORDINATOR", raising=False)
    argv = exec_argv("polyarch-agent@.service", instance="arm-1")
    assert argv[:2] == [INSTALLED_PATH, "agent"]
    args = build_parser().parse_args(argv[1:])
    assert args.config == Path("/etc/polyarch/agent-arm-1.toml")
    args.config = SYSTEMD / "agent.toml.example"
    config = agent_config_from(args)
    assert config.name == "arm-1"
    service = unit("polyarch-agent@.service")["Service"]
    state = Path("/var/lib") / service["StateDirectory"].replace("%i", "arm-1")
    assert config.workspace_dir() == state
    # The token comes from the environment file as POLYARCH_TOKEN (read by
    # client/credentials.py), never from the command line, where `ps` would show it.
    assert service["EnvironmentFile"].lstrip("-") == "/etc/polyarch/agent-%i.env"
    assert "--token" not in " ".join(argv)
    # SIGTERM to the agent only, so its grace period is not cut short by killing buildah.
    assert service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure"
    assert "NoNewPrivileges" not in service  # inherited by RUN steps: setuid tools would fail

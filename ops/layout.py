"""Where an agent's files go on a host, and what they hold (config, token, service)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from importlib import resources

from polyarch.ops.inventory import Host

ROOT = "/opt/polyarch"
CURRENT = f"{ROOT}/current"
SUPERVISOR = f"{ROOT}/polyarch-supervise"
SYSTEMD_UNIT_DIR = "/etc/systemd/system"
AGENT_UNIT = "polyarch-agent@.service"


@dataclass(frozen=True)
class AgentPaths:
    """Every path of agent `name` on its host; uninstall removes exactly these."""

    name: str

    @property
    def config(self) -> str:
        return f"/etc/polyarch/agent-{self.name}.toml"

    @property
    def env(self) -> str:
        return f"/etc/polyarch/agent-{self.name}.env"

    @property
    def state(self) -> str:
        return f"/var/lib/polyarch/agent-{self.name}"

    @property
    def log(self) -> str:
        return f"/var/log/polyarch/agent-{self.name}.log"

    @property
    def pid(self) -> str:
        return f"/run/polyarch/agent-{self.name}.pid"

    @property
    def unit(self) -> str:
        return f"polyarch-agent@{self.name}.service"

    def owned(self) -> list[str]:
        """The files and folders that are this agent's alone."""
        return [self.config, self.env, self.state, self.log, self.pid]


def version_dir(version: str) -> str:
    return f"{ROOT}/{version}"


def _toml_value(value: object) -> str:
    # TOML's basic strings and arrays of them are JSON's: json.dumps writes both correctly
    return json.dumps(value)


def agent_config(host: Host, coordinator: str) -> str:
    """The agent's TOML ([agent] table, keys as `polyarch agent`'s settings)."""
    paths = AgentPaths(host.name)
    settings: dict[str, object] = {
        "coordinator": coordinator,
        "name": host.name,
        "builder": host.builder,
        "slots": host.slots,
        "work_dir": f"{paths.state}/work",
        "state_dir": f"{paths.state}/identity",
    }
    if host.builder == "docker":
        settings["docker_binary"] = host.docker_binary
    if host.native:
        settings["native"] = list(host.native)
    if host.emulated:
        settings["emulated"] = list(host.emulated)
    lines = ["# written by `polyarch deploy`; changes are replaced on the next install", "[agent]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def agent_env(token: str) -> str:
    """The environment file with the enrolment token (mode 0600 on the host)."""
    return f"POLYARCH_TOKEN={token}\n"


def supervisor_script() -> str:
    """The POSIX sh supervisor for hosts without systemd (restart on exit, pid file, log)."""
    return resources.files("polyarch.ops").joinpath("polyarch-supervise.sh").read_text()


def agent_unit() -> str:
    """The templated systemd unit (deploy/systemd's, with the install's paths)."""
    return resources.files("polyarch.ops").joinpath(AGENT_UNIT).read_text()


def quote(*words: str) -> str:
    return " ".join(shlex.quote(w) for w in words)

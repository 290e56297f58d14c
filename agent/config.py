"""The agent's configuration: one dataclass of defaults, then a TOML file, then flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyarch.agent.coordinators import split_addresses
from polyarch.client.api import COORDINATOR_ENV, DEFAULT_COORDINATOR
from polyarch.proto.agent_protocol import DEFAULT_HEARTBEAT_INTERVAL, MAX_AGENT_SLOTS
from polyarch.proto.config_files import ConfigError, read_toml_table
from polyarch.proto.platforms import Platform, PlatformError, parse_platforms
from polyarch.proto.trust import NAME_PATTERN, ClientTrust

BUILDERS = ("docker", "buildah")
WORK_ROOT = Path("/var/lib/polyarch-agent")


@dataclass
class AgentConfig:
    """Every setting of `polyarch agent`, with its default. A `--config FILE` (TOML, table
    [agent], keys as the field names) overrides these; flags override the file."""

    # HOST:PORT, or several comma-separated (an active one and standbys: tried in order)
    coordinator: str = DEFAULT_COORDINATOR  # $POLYARCH_COORDINATOR comes before the file
    name: str = ""  # required
    builder: str = ""  # required: docker or buildah
    docker_binary: str = "docker"
    # None = detected at start (the machine, and binfmt_misc's QEMU handlers)
    native: list[Platform] | None = None
    emulated: list[Platform] | None = None
    slots: int = 2
    work_dir: Path | None = None  # None = WORK_ROOT/NAME
    state_dir: Path | None = None  # the enrolled identity; None = WORK_DIR/state
    # buildah's containers-storage (one per platform below it): its layer cache. Agents on
    # one host each keep their own; None = WORK_DIR/buildah-storage
    storage_dir: Path | None = None
    insecure_registries: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    # Used only until the coordinator's Welcome sets the pace (it owns the lease).
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    # On SIGTERM running builds get this long, then are handed back to the queue.
    shutdown_grace: float = 60.0
    # A build with no result after this long fails, retryably (a hung emulated step).
    job_timeout: float = 7200.0
    metrics_listen: str = ""  # "" = no metrics endpoint
    reconnect_max_delay: float = 5.0
    # A client certificate from the operator's PKI instead of enrolment (both together).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # the coordinators' agent ports (one, or one per coordinator); "" = enrolment tells,
    # or with tls_cert each coordinator's port + 1
    agent_channel: str = ""
    # Resolved at start, never read from a file or flag: how the agent channel is reached.
    trust: ClientTrust = field(default_factory=lambda: ClientTrust(insecure=True))
    channel_address: str = ""  # HOST:PORT[,HOST:PORT...]; "" = coordinator

    def workspace_dir(self) -> Path:
        """Where jobs, contexts and builder storage live."""
        return self.work_dir or WORK_ROOT / self.name


_RUNTIME_ONLY = frozenset({"trust", "channel_address"})
SETTINGS = tuple(f.name for f in dataclasses.fields(AgentConfig) if f.name not in _RUNTIME_ONLY)
# flag attribute on the argparse namespace -> setting (where they differ)
_FLAG_FIELDS = {"insecure_registry": "insecure_registries", "label": "labels"}


def _fail(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"agent setting {key} must be {expected}, not {value!r}")


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(key, "a string", value)
    return value


def _address(key: str, value: Any) -> str:
    host, sep, port = _text(key, value).rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise _fail(key, "HOST:PORT", value)
    return str(value)


def _address_or_off(key: str, value: Any) -> str:
    return "" if _text(key, value) in ("", "off", "none") else _address(key, value)


def _addresses(key: str, value: Any) -> str:
    """HOST:PORT, several comma-separated, or (in the file) a list of them: kept as one
    comma-separated string, each entry checked."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) for item in items):
        raise _fail(key, "HOST:PORT, or several comma-separated", value)
    try:
        return ",".join(split_addresses(",".join(items), key))
    except ValueError as exc:
        raise ConfigError(f"agent setting {exc}") from None


def _addresses_or_off(key: str, value: Any) -> str:
    return "" if value in ("", "off", "none") else _addresses(key, value)


def _agent_name(key: str, value: Any) -> str:
    if not NAME_PATTERN.match(_text(key, value)):
        rule = "letters, digits, '.', '_' and '-' (at most 63, starting alphanumeric)"
        raise _fail(key, rule, value)
    return str(value)


def _builder(key: str, value: Any) -> str:
    if _text(key, value) not in BUILDERS:
        raise _fail(key, " or ".join(BUILDERS), value)
    return str(value)


def _slots(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, "an integer", value)
    if not 1 <= value <= MAX_AGENT_SLOTS:
        raise _fail(key, f"from 1 to {MAX_AGENT_SLOTS}", value)
    return value


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(key, "a number of seconds", value)
    if value < 0 or (value == 0 and key != "shutdown_grace"):
        raise _fail(key, "a positive number of seconds", value)
    return float(value)


def _path(key: str, value: Any) -> Path | None:
    return Path(_text(key, value)) if value else None


def _strings(key: str, value: Any) -> list[str]:
    """A string or a list of strings; commas separate items in either."""
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in items):
        raise _fail(key, "a string or a list of strings", value)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _platforms(key: str, value: Any) -> list[Platform]:
    items = _strings(key, value)
    if key == "emulated" and [item.lower() for item in items] == ["none"]:
        return []  # build only the native platform(s)
    try:
        return parse_platforms(items)
    except PlatformError as exc:
        raise ConfigError(f"agent setting {key}: {exc}") from None


def _labels(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _fail(key, "a table of strings", value)
    return dict(value)


_COERCE: dict[str, Callable[[str, Any], Any]] = {
    "coordinator": _addresses, "name": _agent_name, "builder": _builder,
    "docker_binary": _text, "native": _platforms, "emulated": _platforms, "slots": _slots,
    "work_dir": _path, "state_dir": _path, "storage_dir": _path,
    "insecure_registries": _strings, "labels": _labels,
    "heartbeat_interval": _seconds, "shutdown_grace": _seconds, "job_timeout": _seconds,
    "metrics_listen": _address_or_off, "reconnect_max_delay": _seconds,
    "tls_cert": _path, "tls_key": _path, "agent_channel": _addresses_or_off,
}  # fmt: skip


def _label_pairs(values: list[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not key or not sep:
            raise ConfigError(f"--label {value!r}: expected KEY=VALUE")
        pairs[key] = text
    return pairs


def agent_config_from(args: argparse.Namespace) -> AgentConfig:
    """Defaults, then $POLYARCH_COORDINATOR, then --config FILE, then the flags given."""
    given: dict[str, Any] = {}
    if os.environ.get(COORDINATOR_ENV):
        given["coordinator"] = os.environ[COORDINATOR_ENV]
    if getattr(args, "config", None):
        given.update(read_toml_table(Path(args.config), "agent", SETTINGS))
    flag_of = {name: flag for flag, name in _FLAG_FIELDS.items()}
    for name in SETTINGS:
        value = getattr(args, flag_of.get(name, name), None)
        if value is not None and value != []:
            given[name] = _label_pairs(value) if name == "labels" else value
    values = {name: _COERCE[name](name, value) for name, value in given.items()}
    for required in ("name", "builder"):
        if not values.get(required):
            raise ConfigError(f"agent setting {required} is required (--{required} or the file)")
    config = AgentConfig(**values)
    both = sorted(str(p) for p in set(config.native or ()) & set(config.emulated or ()))
    if both:
        raise ConfigError(f"{', '.join(both)} given as both native and emulated")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("agent settings tls_cert and tls_key go together")
    channels, coordinators = config.agent_channel.split(","), config.coordinator.split(",")
    if config.agent_channel and len(channels) not in (1, len(coordinators)):
        raise ConfigError(
            f"agent setting agent_channel lists {len(channels)} addresses for "
            f"{len(coordinators)} coordinators: give one, or one per coordinator in order"
        )
    return config


def add_agent_flags(parser: argparse.ArgumentParser) -> None:
    """`polyarch agent`'s settings as flags. None of them has a default here: an absent flag
    leaves the config file's value, or AgentConfig's default (named in the help)."""
    d = AgentConfig()
    add = parser.add_argument
    add("--config", type=Path, metavar="FILE", help="a TOML file with an [agent] table")
    add("--coordinator", metavar="HOST:PORT[,HOST:PORT]",
        help=f"the coordinator, or several tried in order (an active one and standbys; "
        f"default ${COORDINATOR_ENV} or {d.coordinator})")  # fmt: skip
    add("--name", help="required; letters, digits, '.', '_', '-' (at most 63)")
    add("--builder", choices=BUILDERS, help="required")
    add("--native", action="append", metavar="PLATFORMS", help="default: detected")
    add("--emulated", action="append", metavar="PLATFORMS",
        help="built under QEMU (default: binfmt_misc; none: none)")  # fmt: skip
    add("--slots", type=int, help=f"concurrent jobs, 1-{MAX_AGENT_SLOTS} (default {d.slots})")
    add("--docker-binary", metavar="PATH", help=f"default {d.docker_binary}")
    add("--work-dir", metavar="DIR", help=f"default {WORK_ROOT}/NAME")
    add("--storage-dir", metavar="DIR",
        help="buildah: images and layer cache (default WORK_DIR/buildah-storage)")  # fmt: skip
    add("--state-dir", metavar="DIR",
        help="enrolment key and certificate (default: WORK_DIR/state)")  # fmt: skip
    add("--insecure-registry", action="append", metavar="HOST",
        help="registry reached over plain HTTP (repeatable; loopback always is)")  # fmt: skip
    add("--label", action="append", metavar="KEY=VALUE", help="reported to the coordinator")
    add("--job-timeout", type=float, metavar="SECONDS",
        help=f"fail (retryably) a build with no result after this long "
        f"(default {d.job_timeout:g})")  # fmt: skip
    add("--shutdown-grace", type=float, metavar="SECONDS",
        help=f"on SIGTERM, wait this long for jobs, then hand them back "
        f"(default {d.shutdown_grace:g})")  # fmt: skip
    add("--metrics-listen", metavar="ADDR", help="Prometheus endpoint (default: none)")
    add("--tls-cert", metavar="PEM", help="a client cert from the operator's PKI (no enrolment)")
    add("--tls-key", metavar="PEM", help="its key")
    add("--agent-channel", metavar="HOST:PORT[,HOST:PORT]",
        help="the coordinator's agent port, or one per --coordinator (default: as enrolment "
        "reported; with --tls-cert each coordinator's port + 1)")  # fmt: skip

"""The coordinator's configuration: one dataclass of defaults, then a TOML file, then flags."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyarch.coordinator.database_address import (
    DatabaseAddressError,
    read_database_file,
    refuse_password,
)
from polyarch.coordinator.limits import Limits, LimitSyntaxError, with_overrides
from polyarch.proto.agent_protocol import DEFAULT_AGENT_LEASE
from polyarch.proto.config_files import ConfigError as ConfigError  # server.py imports it here
from polyarch.proto.config_files import read_toml_table
from polyarch.proto.cosign import load_key_file
from polyarch.proto.references import ReferenceError, parse_reference


@dataclass
class CoordinatorConfig:
    """Every setting of `polyarch coordinator`, with its default. A `--config FILE` (TOML,
    table [coordinator], keys as the field names, limits in [coordinator.limits]) overrides
    these; flags override the file."""

    listen: str = "127.0.0.1:7600"
    data_dir: Path = Path("/var/lib/polyarch")
    # Where builds, jobs and the trust state (tokens, enrolments, drains, the CA) live:
    # "" = SQLite and files in data_dir; a PostgreSQL connection string
    # (postgresql://USER@HOST:PORT/DB) without a password: `ps` shows it to everyone.
    database: str = ""
    # A file (mode 0600) holding the connection string, password and all, instead.
    database_file: Path | None = None
    # Uploaded build contexts; None = DATA_DIR/contexts. Coordinators on one database must
    # share it (one filesystem: a shared volume, NFS), so the one that takes over has them.
    context_dir: Path | None = None
    # The agent channel (mTLS); "" = the listen host, listen port + 1 (port 0 stays 0).
    agent_listen: str = ""
    # Plaintext, no tokens: refused unless every listen address is loopback.
    insecure: bool = False
    # Extra names or addresses for the server certificate (what clients and agents dial).
    advertise: list[str] = field(default_factory=list)
    # An operator's PKI instead of the coordinator's own CA (all three together).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    limits: Limits = field(default_factory=Limits)
    # Prometheus text on plain HTTP; "" turns it off.
    metrics_listen: str = "127.0.0.1:9600"
    insecure_registries: list[str] = field(default_factory=list)
    docker_config: Path | None = None
    # An agent silent this long loses its jobs to the queue; agents heartbeat three times
    # per lease (the coordinator tells them the interval).
    agent_timeout: float = DEFAULT_AGENT_LEASE
    registry_timeout: float = 30.0
    # How often unused contexts are garbage-collected (the limits say which go).
    context_gc_interval: float = 600.0
    # "registry/repository" for the images of builds that publish no tag (exports, --load).
    scratch_repository: str = ""
    # Supply chain (registry/gate.py): "CMD ... {ref} ..." run on every platform image
    # before the tags move; whether builds may bring their own; how long one run may take.
    scan_command: str = ""
    allow_build_scan_command: bool = False
    scan_timeout: float = 600.0
    # Tag globs (`v*`; `REPO:TAG` globs with a ':') whose existing tags never move.
    immutable_tags: list[str] = field(default_factory=list)
    # PEM EC P-256 private key for builds that ask `--sign-with farm` (read at start; only
    # the loaded key stays in memory)
    sign_key: Path | None = None
    # With a database: campaign to be the one active coordinator (coordinator/ha). False
    # only in-process (tests that need two coordinators serving at once); neither a flag
    # nor a config-file key, so no deployment can run two dispatching coordinators.
    election: bool = True


_PATHS = {"data_dir", "tls_cert", "tls_key", "tls_client_ca", "docker_config", "sign_key",
          "database_file", "context_dir"}  # fmt: skip
_LISTS = {"advertise", "insecure_registries", "immutable_tags"}
_FLOATS = {"agent_timeout", "registry_timeout", "context_gc_interval", "scan_timeout"}
_BOOLS = {"insecure", "allow_build_scan_command"}
_IN_PROCESS = {"election"}  # settable only by code that builds a CoordinatorConfig
# flag attribute on the argparse namespace -> config field (where they differ)
_FLAG_FIELDS = {"insecure_registry": "insecure_registries"}


def _coerce(name: str, value: Any) -> Any:
    if name in _PATHS:
        return None if value in (None, "") else Path(str(value))
    if name in _LISTS:
        items = value if isinstance(value, list) else [value]
        return [h.strip() for item in items for h in str(item).split(",") if h.strip()]
    if name in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{name} must be a number of seconds, not {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, not {value!r}") from None
    if name in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, not {value!r}")
        return value
    return str(value)


def read_config_file(path: Path) -> dict[str, Any]:
    """The [coordinator] table of a TOML file, checked against the known settings."""
    return read_toml_table(
        path, "coordinator",
        (f.name for f in dataclasses.fields(CoordinatorConfig) if f.name not in _IN_PROCESS),
    )  # fmt: skip


def config_from(args: argparse.Namespace) -> CoordinatorConfig:
    """Defaults, then --config FILE, then the flags given on the command line."""
    values: dict[str, Any] = {}
    limit_assignments: list[str] = []
    if getattr(args, "config", None):
        table = read_config_file(Path(args.config))
        limits_table = table.pop("limits", {})
        if not isinstance(limits_table, dict):
            raise ConfigError(f"{args.config}: [coordinator.limits] must be a table")
        limit_assignments += [f"{key}={value}" for key, value in limits_table.items()]
        values.update({key: _coerce(key, value) for key, value in table.items()})
    for name in (f.name for f in dataclasses.fields(CoordinatorConfig)):
        if name in _IN_PROCESS:
            continue
        flag = next((a for a, f in _FLAG_FIELDS.items() if f == name), name)
        given = getattr(args, flag, None)
        if name in _BOOLS and given is False:
            continue  # store_true: absent
        if given is not None and given != []:
            values[name] = _coerce(name, given)
    try:
        values["limits"] = with_overrides(Limits(), [*limit_assignments, *(args.limit or [])])
    except LimitSyntaxError as exc:
        raise ConfigError(str(exc)) from None
    config = CoordinatorConfig(**values)
    where = "--database" if getattr(args, "database", None) else f"database in {args.config}"
    check_database(config, where)
    if config.sign_key is not None:
        try:
            load_key_file(config.sign_key)  # refused now, with a usage exit, not at start
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return config


def check_database(config: CoordinatorConfig, source: str) -> None:
    """Refuses a database setting now (a usage exit), never quoting a password back."""
    if config.database and config.database_file:
        raise ConfigError("give the database as --database or as --database-file, not both")
    try:
        if config.database:
            refuse_password(config.database, source)
        if config.database_file is not None:
            read_database_file(config.database_file)
    except DatabaseAddressError as exc:
        raise ConfigError(str(exc)) from None


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _repository(text: str) -> str:
    try:
        ref = parse_reference(text, default_tag=None)
    except ReferenceError as exc:
        raise argparse.ArgumentTypeError(f"expected REGISTRY/REPOSITORY: {exc}") from None
    if ref.tag or ref.digest:
        raise argparse.ArgumentTypeError(f"expected a repository without tag, got {text!r}")
    return f"{ref.registry}/{ref.repository}"


def _address_or_off(text: str) -> str:
    return "" if text in ("", "off", "none") else _address(text)


def add_coordinator_flags(parser: argparse.ArgumentParser) -> None:
    """`polyarch coordinator`'s flags. None of them has a default here: an absent flag leaves
    the config file's value, or CoordinatorConfig's default (named in the help)."""
    d = CoordinatorConfig()
    add = parser.add_argument
    add("--config", type=Path, metavar="FILE", help="a TOML file with a [coordinator] table")
    add("--listen", type=_address, metavar="ADDR", help=f"clients' TLS port (default {d.listen})")
    add("--data-dir", type=Path, metavar="DIR", help=f"state, CA, tokens (default {d.data_dir})")
    add("--database", metavar="DSN",
        help="keep builds, tokens, enrolments, drains and the CA in PostgreSQL, shared by "
        "every coordinator on it: postgresql://USER@HOST:PORT/DB, no password (use "
        "--database-file, PGPASSFILE or PGPASSWORD); default: SQLite in --data-dir")  # fmt: skip
    add("--database-file", type=Path, metavar="FILE",
        help="a file (mode 0600) holding the PostgreSQL connection string, password "
        "and all")  # fmt: skip
    add("--context-dir", type=Path, metavar="DIR",
        help="uploaded build contexts (default DATA_DIR/contexts); coordinators sharing a "
        "--database must share it too, each keeping its own --data-dir")  # fmt: skip
    add("--metrics-listen", type=_address_or_off, metavar="ADDR",
        help=f"Prometheus endpoint (default {d.metrics_listen}; 'off' disables)")  # fmt: skip
    add("--docker-config", type=Path, metavar="PATH", help="the farm's registry credentials")
    add("--scratch-repository", type=_repository, metavar="REGISTRY/REPO",
        help="where builds without a tag push their images (for exports and --load)")  # fmt: skip
    add("--agent-timeout", type=float, metavar="SECONDS",
        help=f"an agent's lease (default {d.agent_timeout:g})")  # fmt: skip
    add("--agent-listen", type=_address, metavar="ADDR",
        help="the agents' mTLS port (default: --listen's host, port + 1)")  # fmt: skip
    add("--advertise", action="append", metavar="HOST[,HOST]",
        help="names clients and agents dial, for the server certificate")  # fmt: skip
    add("--insecure", action="store_true",
        help="plaintext, no tokens (loopback listen addresses only)")  # fmt: skip
    add("--tls-cert", type=Path, metavar="PEM", help="an operator's server chain")
    add("--tls-key", type=Path, metavar="PEM", help="its private key")
    add("--tls-client-ca", type=Path, metavar="PEM",
        help="the CA agents' client certificates chain to")  # fmt: skip
    add("--scan-command", metavar="'CMD {ref}'",
        help="run on every platform image before any tag moves ({ref} = "
        "REGISTRY/REPO@sha256:...); non-zero fails the build, e.g. "
        "'trivy image --exit-code 1 --severity CRITICAL {ref}'")  # fmt: skip
    add("--allow-build-scan-command", action="store_true",
        help="let builds bring their own --scan-command (when the farm has none)")  # fmt: skip
    add("--scan-timeout", type=float, metavar="SECONDS",
        help=f"one scanner run's limit (default {d.scan_timeout:g})")  # fmt: skip
    add("--immutable-tags", action="append", metavar="GLOB[,GLOB]",
        help="existing tags matching a glob never move (v*: the tag; REPO:TAG globs "
        "with a ':')")  # fmt: skip
    add("--sign-key", type=Path, metavar="PEM",
        help="unencrypted EC P-256 private key: signs the index of builds that ask "
        "--sign-with farm (cosign's format)")  # fmt: skip
    add("--limit", action="append", default=[], metavar="NAME=VALUE",
        help="override a limit, e.g. max_context_bytes=20GiB (repeatable; "
        "see polyarch.coordinator.limits.Limits)")  # fmt: skip

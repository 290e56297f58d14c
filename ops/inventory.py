"""The deploy inventory (TOML): the coordinator agents dial, host defaults and the hosts."""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyarch.proto.platforms import PlatformError, parse_platforms
from polyarch.proto.trust import NAME_PATTERN

BUILDERS = ("buildah", "docker")
_HOST_KEYS = {"name", "address", "port", "user", "key", "known_hosts", "builder", "slots",
              "native", "emulated", "with_qemu", "docker_binary"}  # fmt: skip
_DEFAULT_KEYS = _HOST_KEYS - {"name", "address", "native", "emulated"}
_COORDINATOR_KEYS = {"address", "token", "token_file"}


class InventoryError(ValueError):
    """An inventory that cannot be used, named with the file and the key."""


@dataclass(frozen=True)
class Host:
    """One SSH host and the agent it runs (named `name`)."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    key: Path | None = None
    known_hosts: Path | None = None
    builder: str = "buildah"
    slots: int = 2
    native: tuple[str, ...] = ()  # () = detected by the agent on the host
    emulated: tuple[str, ...] = ()
    with_qemu: bool | None = None  # None: as `deploy install --with-qemu` says
    docker_binary: str = "docker"


@dataclass(frozen=True)
class Inventory:
    path: Path
    coordinator: str
    # the agent-role token agents enrol with: never printed (repr hides it)
    token: str = field(repr=False)
    hosts: tuple[Host, ...]

    def select(self, pattern: str | None) -> list[Host]:
        """The hosts whose name matches the glob (all without one)."""
        if not pattern:
            return list(self.hosts)
        chosen = [h for h in self.hosts if fnmatch.fnmatchcase(h.name, pattern)]
        if not chosen:
            raise InventoryError(f"{self.path}: no host name matches {pattern!r}")
        return chosen


def _path(base: Path, value: Any, where: str) -> Path:
    """Relative to the inventory's folder; `~` is the local user's home."""
    if not isinstance(value, str) or not value:
        raise InventoryError(f"{where}: expected a path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise InventoryError(f"{where}: unknown keys {', '.join(unknown)}")


def _host(raw: dict[str, Any], defaults: dict[str, Any], base: Path, where: str) -> Host:
    _check_keys(raw, _HOST_KEYS, where)
    values = {**defaults, **raw}
    for required in ("name", "address"):
        if not isinstance(values.get(required), str) or not values[required]:
            raise InventoryError(f"{where}: {required} is required")
    if not NAME_PATTERN.match(values["name"]):
        raise InventoryError(f"{where}: name {values['name']!r} is not a valid agent name")
    if values.get("builder", "buildah") not in BUILDERS:
        raise InventoryError(f"{where}: builder must be one of {', '.join(BUILDERS)}")
    for number in ("port", "slots"):
        if number in values and (isinstance(values[number], bool) or
                                 not isinstance(values[number], int)):  # fmt: skip
            raise InventoryError(f"{where}: {number} must be an integer")
    if not isinstance(values.get("with_qemu", False), bool):
        given = "" if "with_qemu" in raw else " (from [defaults])"
        raise InventoryError(f"{where}: with_qemu{given} must be true or false")
    platforms: dict[str, tuple[str, ...]] = {}
    for kind in ("native", "emulated"):
        if not values.get(kind):
            platforms[kind] = ()  # detected by the agent on the host
            continue
        try:
            platforms[kind] = tuple(str(p) for p in parse_platforms(values[kind]))
        except PlatformError as exc:
            raise InventoryError(f"{where}: {kind}: {exc}") from None
    return Host(
        name=values["name"], address=values["address"], port=values.get("port", 22),
        user=str(values.get("user", "root")),
        key=_path(base, values["key"], f"{where}.key") if values.get("key") else None,
        known_hosts=(_path(base, values["known_hosts"], f"{where}.known_hosts")
                     if values.get("known_hosts") else None),
        builder=values.get("builder", "buildah"), slots=values.get("slots", 2),
        native=platforms["native"], emulated=platforms["emulated"],
        with_qemu=values.get("with_qemu"),
        docker_binary=str(values.get("docker_binary", "docker")),
    )  # fmt: skip


def load_inventory(path: Path) -> Inventory:
    """Reads and checks an inventory; errors name the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{path}: not valid TOML: {exc}") from None
    base = path.resolve().parent
    _check_keys(data, {"coordinator", "defaults", "hosts"}, str(path))
    coordinator = data.get("coordinator", {})
    _check_keys(coordinator, _COORDINATOR_KEYS, f"{path}: [coordinator]")
    address = coordinator.get("address")
    if not isinstance(address, str) or ":" not in address:
        raise InventoryError(f"{path}: [coordinator] address must be HOST:PORT")
    token = coordinator.get("token", "")
    if coordinator.get("token_file"):
        token_path = _path(base, coordinator["token_file"], f"{path}: [coordinator] token_file")
        try:
            token = token_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InventoryError(f"{token_path}: cannot read the token: {exc.strerror}") from None
    if not token:
        raise InventoryError(f"{path}: [coordinator] needs token_file (or token)")
    defaults = data.get("defaults", {})
    _check_keys(defaults, _DEFAULT_KEYS, f"{path}: [defaults]")
    hosts = [
        _host(raw, defaults, base, f"{path}: hosts[{i}]")
        for i, raw in enumerate(data.get("hosts", []))
    ]
    names = [h.name for h in hosts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InventoryError(f"{path}: host names used twice: {', '.join(duplicates)}")
    if not hosts:
        raise InventoryError(f"{path}: no [[hosts]]")
    return Inventory(path, address, token, tuple(hosts))

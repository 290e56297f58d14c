"""Reading one table of a TOML config file, for the coordinator's and the agent's settings."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or flag that names an unknown setting or has a bad value."""


def read_toml_table(path: Path, table: str, known: Iterable[str]) -> dict[str, Any]:
    """The [table] of a TOML file (empty when absent); a key not in `known` is an error."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values = data.get(table, {})
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: [{table}] must be a table")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown {table} setting(s) {', '.join(unknown)}")
    return values

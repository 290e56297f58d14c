"""Copies of this source tree with another version number, for deploy's upgrade tests."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .services import REPO_ROOT

_TOP_LEVEL = ("pyproject.toml", "README.md", "agent", "client", "coordinator", "ops", "proto")


def source_with_version(dest: Path, version: str, broken: bool = False) -> Path:
    """A copy of this source tree whose wheel is `version`; `broken`: its agent exits at once."""
    dest.mkdir(parents=True)
    for top in _TOP_LEVEL:
        source = REPO_ROOT / top
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
        text, count = re.subn(
            r"(def cmd_agent\(args: argparse\.Namespace, session: \w+\) -> int:\n)",
            "\\1    raise SystemExit('this agent is broken on purpose')\n", cli.read_text(),
        )  # fmt: skip
        assert count == 1, "cmd_agent moved: the broken version would start"
        cli.write_text(text)
    return dest

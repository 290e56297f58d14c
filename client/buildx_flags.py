"""`docker buildx build` flags polyarch does not honour: accepted by name, refused with why."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

# flag -> why the farm cannot honour it (the README's buildx table says the same). Taking
# them by name gives a CI user the reason, not argparse's "unrecognized arguments".
REFUSED = {
    "--add-host": "agents build on their own hosts' networks; no per-build /etc/hosts entries",
    "--allow": "no entitlements (network.host, security.insecure) are granted to builds",
    "--attest": "the farm attaches SLSA provenance only: use --provenance (no SBOM is made)",
    "--build-context": "named build contexts are not supported: a farm build has one context",
    "--call": "only builds run (no subrequests such as lint or outline)",
    "--cgroup-parent": "agents place builds in their own cgroups",
    "--network": "builds use the agent's default network",
    "--no-cache-filter": "--no-cache is all or nothing on the farm",
    "--sbom": "no SBOM is made on the farm (SLSA provenance is: --provenance)",
    "--shm-size": "agents use their builder's default /dev/shm",
    "--ssh": "agents hold no SSH agent of the client to forward",
    "--ulimit": "agents use their builder's default limits",
}
# Values of refused flags that ask for what the farm does anyway: accepted.
HARMLESS = {
    "--network": {"default"},
    "--sbom": {"false", "0"},
    "--attest": {"type=provenance,disabled=true", "type=sbom,disabled=true"},
}
# Flags that mean nothing on the farm and are ignored with a warning, so existing CI lines work.
IGNORED = {
    "--builder": "the farm is the builder",
    "--debug": "no debug shell on the farm",
}


class _Refuse(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        flag = str(option_string)
        if isinstance(values, str) and values.lower() in HARMLESS.get(flag, set()):
            return
        parser.error(f"{flag}: not supported: {REFUSED[flag]}")


class _Ignore(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        why = IGNORED[str(option_string)]
        print(f"polyarch: warning: {option_string} ignored: {why}", file=sys.stderr)


def add_buildx_only_flags(parser: argparse.ArgumentParser) -> None:
    """Registers REFUSED and IGNORED on `polyarch build`'s parser (hidden from --help)."""
    for flag in REFUSED:
        parser.add_argument(flag, action=_Refuse, nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--builder", action=_Ignore, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action=_Ignore, nargs=0, help=argparse.SUPPRESS)

"""`polyarch deploy install|upgrade|status|uninstall INVENTORY`: flags, the result table, JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from polyarch.client.api import COORDINATOR_ENV, BuildClient, PolyarchError
from polyarch.client.credentials import credentials_from_args
from polyarch.ops.deploy import DeployOptions, HostResult, run_deploy
from polyarch.ops.inventory import InventoryError, load_inventory
from polyarch.ops.qemu import summary_lines
from polyarch.ops.wheelhouse import WheelhouseError

ACTIONS = {
    "install": "install agents (wheelhouse over SFTP, config, token, service) and wait for them",
    "upgrade": "roll a new version through the hosts: drain, switch, restart, undrain",
    "status": "each host's installed version, service kind and whether it is connected",
    "uninstall": "drain and remove agents, their files and enrolments",
}


def add_deploy_command(commands: Any, credentials: argparse.ArgumentParser) -> None:
    """Adds `polyarch deploy ACTION` (an argparse subparsers object; `credentials` carries the
    credential flags: deploy talks to the coordinator as an admin)."""
    deploy = commands.add_parser("deploy", help="install, upgrade and remove agents over SSH")
    actions = deploy.add_subparsers(dest="deploy_action", required=True, metavar="ACTION")
    for action, summary in ACTIONS.items():
        p = actions.add_parser(action, parents=[credentials], help=summary, description=summary)
        p.add_argument("inventory", type=Path, metavar="INVENTORY", help="the TOML inventory")
        # no default: without it (or $POLYARCH_COORDINATOR) deploy talks to the coordinator
        # the inventory's agents dial
        p.add_argument("--coordinator", metavar="HOST:PORT",
                       help="the coordinator to ask (default: the inventory's)")  # fmt: skip
        p.add_argument("--known-hosts", type=Path, metavar="FILE",
                       default=Path("~/.ssh/known_hosts").expanduser(),
                       help="host keys to check against (default ~/.ssh/known_hosts)")  # fmt: skip
        p.add_argument("--accept-new-host-keys", action="store_true",
                       help="accept and record keys of hosts not in known_hosts")  # fmt: skip
        p.add_argument("--ssh-timeout", type=float, default=15.0, metavar="SECONDS")
        if action != "status":
            p.add_argument("--hosts", metavar="GLOB", help="only the hosts whose name matches")
            p.add_argument("--drain-timeout", type=float, default=600.0, metavar="SECONDS")
        if action != "status":
            # upgrade: hosts installing the new version beside the old at once
            # (--max-unavailable bounds the roll itself)
            p.add_argument("--parallel", type=int, default=4, metavar="N",
                           help="hosts worked on at once")  # fmt: skip
        if action in ("install", "uninstall"):
            p.add_argument("--dry-run", action="store_true", help="check hosts, change nothing")
        if action == "install":
            p.add_argument("--with-qemu", action="store_true",
                           help="register the QEMU binfmt handlers of the hosts' packages "
                                "(hosts whose with_qemu the inventory sets follow it)")  # fmt: skip
        if action in ("install", "upgrade"):
            p.add_argument("--start-timeout", type=float, default=90.0, metavar="SECONDS",
                           help="how long an agent may take to connect")  # fmt: skip
            p.add_argument("--project", type=Path, metavar="DIR",
                           help="the polyarch source to install (default: this one)")  # fmt: skip
        if action == "upgrade":
            p.add_argument("--max-unavailable", type=int, default=1, metavar="N")
        if action == "status":
            p.add_argument("--json", action="store_true")
        p.set_defaults(handler=lambda args, _session: run_deploy_command(args))


def run_deploy_command(args: argparse.Namespace) -> int:
    try:
        inventory = load_inventory(args.inventory)
        hosts = inventory.select(getattr(args, "hosts", None))
    except InventoryError as exc:
        print(f"polyarch: error: {exc}", file=sys.stderr)
        return 2
    # the coordinator the operator reaches; by default the one the agents dial
    address = args.coordinator or os.environ.get(COORDINATOR_ENV) or inventory.coordinator
    with tempfile.TemporaryDirectory(prefix="polyarch-deploy-") as scratch:
        options = DeployOptions(
            known_hosts=args.known_hosts, accept_new_host_keys=args.accept_new_host_keys,
            parallel=max(1, getattr(args, "parallel", 4)), connect_timeout=args.ssh_timeout,
            start_timeout=getattr(args, "start_timeout", 90.0),
            drain_timeout=getattr(args, "drain_timeout", 600.0),
            max_unavailable=max(1, getattr(args, "max_unavailable", 1)),
            dry_run=getattr(args, "dry_run", False), project=getattr(args, "project", None),
            with_qemu=getattr(args, "with_qemu", False),
            wheel_dir=Path(scratch),
        )  # fmt: skip

        async def run() -> list[HostResult]:
            credentials = credentials_from_args(args)
            async with BuildClient(address, credentials=credentials) as client:
                return await run_deploy(args.deploy_action, inventory, client, options, hosts)

        try:
            results = asyncio.run(run())
        except (PolyarchError, WheelhouseError) as exc:
            print(f"polyarch: error: {exc}", file=sys.stderr)
            return 1
    if getattr(args, "json", False):
        rows = [
            {"host": r.host, "name": r.host, "service": r.service, "version": r.after,
             "connected": r.connected, "error": r.error,
             "qemu": r.qemu.platforms if r.qemu else []}
            for r in results
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(results))
        for r in results:
            if r.qemu is not None and r.qemu.source:  # registered by this install
                print("\n".join(summary_lines(r.host, r.qemu)))
    failed = [r.host for r in results if r.error]
    if failed:
        print(f"polyarch: {len(failed)} of {len(results)} hosts failed: {', '.join(failed)}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def render_table(results: list[HostResult]) -> str:
    """host, action, versions before and after, time, connected, error: one row per host."""
    header = ("HOST", "ACTION", "BEFORE", "AFTER", "SERVICE", "CONNECTED", "TIME", "ERROR")
    rows = [header] + [
        (r.host, r.action, r.before or "-", r.after or "-", r.service or "-",
         "yes" if r.connected else "no", f"{r.seconds:.1f}s", r.error or "")
        for r in results
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in rows]  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)

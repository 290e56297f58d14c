"""One host's side of a deploy: facts, version folders, the agent's files and its service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polyarch.ops import layout
from polyarch.ops.inventory import Host
from polyarch.ops.layout import AgentPaths, quote
from polyarch.ops.ssh import HostError, RemoteHost, wait_gone

_FACTS = r"""
uname -m
command -v python3 >/dev/null && python3 -c 'import platform, sys
print("%d.%d" % sys.version_info[:2]); print(platform.libc_ver()[1] or "?")' || printf '-\n-\n'
if [ -d /run/systemd/system ]; then echo systemd; else echo supervised; fi
readlink /opt/polyarch/current 2>/dev/null || echo -
"""


@dataclass(frozen=True)
class HostFacts:
    """What deploy needs to know of a host before it changes anything."""

    machine: str  # uname -m
    python: str  # "3.11", or "" without python3
    glibc: str
    service: str  # "systemd" or "supervised"
    version: str  # what /opt/polyarch/current links to, "" when nothing is installed


async def host_facts(remote: RemoteHost) -> HostFacts:
    out = (await remote.run(_FACTS, step="reading the host's facts")).stdout.split()
    if len(out) != 5:
        raise HostError(f"{remote.host.name}: unexpected facts from the host: {out}")
    machine, python, glibc, service, version = out
    if python == "-":
        raise HostError(f"{remote.host.name}: python3 (3.11 or newer) is needed on the host")
    return HostFacts(machine, python, glibc, service, "" if version == "-" else version)


async def install_version(remote: RemoteHost, version: str, wheels: list[Path]) -> bool:
    """Makes /opt/polyarch/VERSION from the uploaded wheelhouse (no index, no internet);
    False when that version is already installed. pip runs from its own wheel, so the host
    needs neither pip nor python3-venv."""
    target = layout.version_dir(version)
    done = await remote.run(f"test -f {quote(target + '/.complete')}", step="checking", check=False)
    if done.status == 0:
        return False
    upload = f"{layout.ROOT}/.upload-{version}"
    await remote.run(f"rm -rf {quote(upload)} && mkdir -p {quote(upload)}", step="preparing")
    await remote.upload(wheels, upload, step="uploading the wheelhouse")
    script = f"""set -e
rm -rf {quote(target)}
python3 -m venv --without-pip {quote(target)}
set -- {quote(upload)}/pip-*.whl
{quote(target + "/bin/python")} "$1/pip" install --quiet --no-index \
    --find-links {quote(upload)} --no-cache-dir --disable-pip-version-check \
    --no-warn-script-location {quote(f"polyarch=={version}")}
{quote(target + "/bin/polyarch")} --version
touch {quote(target + "/.complete")}
rm -rf {quote(upload)}
"""
    await remote.run(script, step=f"installing polyarch {version}")
    return True


async def switch_current(remote: RemoteHost, version: str) -> None:
    """Points /opt/polyarch/current at VERSION in one rename (never a moment without it)."""
    link = f"{layout.CURRENT}.new"
    await remote.run(
        f"ln -sfn {quote(version)} {quote(link)} && mv -T {quote(link)} {quote(layout.CURRENT)}",
        step=f"switching to {version}",
    )


async def prune_versions(remote: RemoteHost, keep: list[str]) -> None:
    """Removes version folders other than `keep` (the live one and the rollback target)."""
    kept = " ".join(f"-e {quote(v)}" for v in keep if v) or "-e ''"
    await remote.run(
        f"cd {layout.ROOT} && for v in $(ls -1 | grep -v -x -F {kept} -e current "
        f"-e polyarch-supervise -e 'current.new'); do rm -rf -- \"$v\"; done",
        step="removing old versions", check=False,
    )  # fmt: skip


async def write_agent_files(remote: RemoteHost, host: Host, coordinator: str, token: str) -> None:
    """Config and token files (0600: the token is a secret), and the state and log folders."""
    paths = AgentPaths(host.name)
    await remote.run(
        "mkdir -p /etc/polyarch /var/log/polyarch && "
        f"mkdir -p -m 0700 {quote(paths.state)} && chmod 0700 {quote(paths.state)}",
        step="making the agent's folders",
    )
    config = layout.agent_config(host, coordinator).encode()
    await remote.write(paths.config, config, 0o600, step="writing the agent's config")
    await remote.write(paths.env, layout.agent_env(token).encode(), 0o600, step="writing the token")


async def start_service(remote: RemoteHost, host: Host, service: str) -> None:
    """Starts (or restarts) the agent's service: a systemd unit, or the supervisor."""
    paths = AgentPaths(host.name)
    if service == "systemd":
        unit = f"{layout.SYSTEMD_UNIT_DIR}/{layout.AGENT_UNIT}"
        await remote.write(unit, layout.agent_unit().encode(), 0o644, step="writing the unit")
        await remote.run(
            f"systemctl daemon-reload && systemctl enable {quote(paths.unit)} && "
            f"systemctl restart {quote(paths.unit)}",
            step="starting the systemd unit",
        )
        return
    await remote.write(
        layout.SUPERVISOR, layout.supervisor_script().encode(), 0o755, step="writing supervisor"
    )
    await stop_service(remote, host, service)
    await remote.run(
        # setsid -f: the supervisor leaves this session at once, holding none of its pipes
        f"mkdir -p /run/polyarch && setsid -f {quote(layout.SUPERVISOR, host.name)} "
        "</dev/null >/dev/null 2>&1",
        step="starting the supervised agent",
    )


async def stop_service(remote: RemoteHost, host: Host, service: str) -> None:
    """Stops the agent (SIGTERM: running builds get its shutdown grace), and waits for it."""
    paths = AgentPaths(host.name)
    if service == "systemd":
        await remote.run(f"systemctl stop {quote(paths.unit)}", step="stopping", check=False)
        return
    await remote.run(
        f'p=$(cat {quote(paths.pid)} 2>/dev/null) && kill -TERM "$p" 2>/dev/null; true',
        step="stopping the supervised agent",
    )
    await wait_gone(remote, paths.pid)


async def remove_agent(remote: RemoteHost, host: Host, service: str) -> None:
    """Removes the agent's service and files; the last agent of a host takes /opt/polyarch,
    the unit template and the empty folders with it."""
    paths = AgentPaths(host.name)
    await stop_service(remote, host, service)
    if service == "systemd":
        await remote.run(f"systemctl disable {quote(paths.unit)}", step="disabling", check=False)
    await remote.run(f"rm -rf -- {quote(*paths.owned())}", step="removing the agent's files")
    last = f"""if ! ls /etc/polyarch/agent-*.toml >/dev/null 2>&1; then
    rm -rf -- {layout.ROOT} {quote(layout.SYSTEMD_UNIT_DIR + "/" + layout.AGENT_UNIT)}
    rmdir /etc/polyarch /var/lib/polyarch /var/log/polyarch /run/polyarch 2>/dev/null
fi; true"""
    await remote.run(last, step="removing polyarch from the host")
    if service == "systemd":
        await remote.run("systemctl daemon-reload", step="reloading systemd", check=False)


async def left_behind(remote: RemoteHost, host: Host) -> list[str]:
    """What of the agent is still on the host: its files and any process (for checks)."""
    paths = AgentPaths(host.name)
    found = await remote.run(
        f'for p in {quote(*paths.owned())}; do [ -e "$p" ] && echo "$p"; done; '
        f"ps -eo args= | grep -E {quote(_process_pattern(host.name))} | grep -v grep; true",
        step="looking for leftovers",
    )
    return [line for line in found.stdout.splitlines() if line.strip()]


def _process_pattern(name: str) -> str:
    """The agent's and its supervisor's command lines (names are [A-Za-z0-9._-])."""
    escaped = name.replace(".", "\\.")
    return f"agent-{escaped}\\.toml|polyarch-supervise {escaped}$"


def wheel_version(wheels: list[Path]) -> str:
    """polyarch's version, from its wheel's file name (polyarch-VERSION-py3-none-any.whl)."""
    for wheel in wheels:
        name, version, *_ = wheel.name.split("-")
        if name == "polyarch":
            return version
    raise HostError("the wheelhouse holds no polyarch wheel")

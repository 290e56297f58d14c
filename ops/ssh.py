"""SSH to one host (asyncssh): host keys checked against known_hosts, commands, file writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from polyarch.ops.inventory import Host

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 600.0


class HostError(Exception):
    """A host that could not be reached, or did not do what it was asked (host and step named)."""


@dataclass(frozen=True)
class Completed:
    status: int
    stdout: str
    stderr: str


def _pattern(host: Host) -> str:
    """How known_hosts names the host: `addr`, or `[addr]:port` off port 22 (as ssh writes)."""
    return host.address if host.port == 22 else f"[{host.address}]:{host.port}"


def _recorded_keys(known: Path, host: Host) -> asyncssh.SSHKnownHosts | None:
    """known_hosts, parsed once, when it holds any key (or CA) for the host: then a mismatch is
    an attack or a reinstall, never something to accept. None when the host is not in it."""
    if not known.exists():
        return None
    parsed = asyncssh.read_known_hosts(str(known))
    matched = parsed.match(host.address, host.address, host.port)
    return parsed if matched[0] or matched[1] else None


class RemoteHost:
    """An open SSH connection to a host of the inventory, as its configured user."""

    def __init__(self, host: Host, connection: asyncssh.SSHClientConnection) -> None:
        self.host = host
        self._connection = connection

    @classmethod
    async def open(
        cls, host: Host, known_hosts: Path, accept_new: bool, timeout: float = CONNECT_TIMEOUT
    ) -> RemoteHost:
        """Connects, checking the host key against `known_hosts` (the host's own file when the
        inventory names one). An unknown key is refused unless `accept_new`: then it is
        accepted and recorded; a key that differs from a recorded one is always refused. The
        key is checked before any credential is offered."""
        known = host.known_hosts or known_hosts
        where = f"{host.user}@{host.address}:{host.port}"
        recorded = _recorded_keys(known, host)
        # an unknown host is checked against nothing, so its key is refused
        trusted: object = recorded if recorded is not None else asyncssh.import_known_hosts("")
        if recorded is None and accept_new:
            trusted = None  # any key, recorded below
        options: dict[str, object] = {
            "username": host.user, "port": host.port, "connect_timeout": timeout,
            "known_hosts": trusted, "agent_path": None,
            "client_keys": [str(host.key)] if host.key else (),
        }  # fmt: skip
        try:
            connection = await asyncssh.connect(host.address, **options)
        except asyncssh.HostKeyNotVerifiable:
            if recorded is None:
                raise HostError(
                    f"{where}: its host key is not in {known}; verify it and add it there, or "
                    "pass --accept-new-host-keys"
                ) from None
            raise HostError(
                f"{where}: its host key does not match {known}: refusing to connect (reinstalled "
                "host, or not the host you think); remove the old key only once you know"
            ) from None
        except asyncssh.PermissionDenied:
            key = f"key {host.key}" if host.key else "the default keys"
            raise HostError(f"{where}: SSH login refused for {host.user} with {key}") from None
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            raise HostError(f"{where}: cannot connect: {exc or type(exc).__name__}") from None
        if recorded is None:
            key_line = connection.get_server_host_key()
            if key_line is not None:
                public = key_line.export_public_key().decode().split()[:2]
                with known.open("a", encoding="utf-8") as out:
                    out.write(f"{_pattern(host)} {' '.join(public)}\n")
        return cls(host, connection)

    async def close(self) -> None:
        self._connection.close()
        with contextlib.suppress(Exception):
            await self._connection.wait_closed()

    async def run(
        self, command: str, *, step: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> Completed:
        """Runs `command` under sh; HostError naming `step` on a non-zero exit (with check)."""
        log.debug("[%s] %s", self.host.name, step)
        try:
            done = await self._connection.run(command, check=False, timeout=timeout)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise HostError(f"{self.host.name}: {step}: {exc or type(exc).__name__}") from None
        result = Completed(int(done.exit_status or 0), str(done.stdout), str(done.stderr))
        if check and result.status != 0:
            why = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
            raise HostError(f"{self.host.name}: {step} failed ({result.status}): {' | '.join(why)}")
        return result

    async def write(self, path: str, data: bytes, mode: int, *, step: str) -> None:
        """Writes a file through SFTP under a temporary name with `mode` set before a byte is
        written, then renames it into place: no reader sees it partial or too open."""
        partial = f"{path}.polyarch-partial"
        try:
            async with self._connection.start_sftp_client() as sftp:
                attrs = asyncssh.SFTPAttrs(permissions=mode)
                async with sftp.open(partial, "wb", attrs) as out:
                    await out.write(data)
                await sftp.chmod(partial, mode)  # the remote umask may have narrowed it
                await sftp.posix_rename(partial, path)
        except (asyncssh.Error, OSError) as exc:
            raise HostError(f"{self.host.name}: {step}: writing {path}: {exc}") from None

    async def upload(self, files: list[Path], folder: str, *, step: str) -> None:
        try:
            async with self._connection.start_sftp_client() as sftp:
                await sftp.put([str(f) for f in files], folder)
        except (asyncssh.Error, OSError) as exc:
            raise HostError(f"{self.host.name}: {step}: {exc}") from None


async def wait_gone(remote: RemoteHost, pid_file: str, timeout: float = 60.0) -> None:
    """Polls until the process in `pid_file` has ended (the file may already be gone)."""
    check = f'p=$(cat {shlex.quote(pid_file)} 2>/dev/null) && kill -0 "$p" 2>/dev/null'
    deadline = asyncio.get_running_loop().time() + timeout
    while (await remote.run(check, step="waiting for the agent to stop", check=False)).status == 0:
        if asyncio.get_running_loop().time() > deadline:
            raise HostError(f"{remote.host.name}: the agent did not stop within {timeout:g}s")
        await asyncio.sleep(0.5)

"""SSH hosts for deploy tests: sshd in containers on a test-made network, each its own address.

Each host is a container of `polyarch-test/ssh-host` (made offline with `docker import`): its
own writable root filesystem (so /opt, /etc/polyarch, /var/lib and /var/log are the host's
alone), the machine's /usr bind-mounted read-only for sshd, python3 and the docker CLI, and
the docker socket, so an agent with the docker builder drives the machine's dockerd. sshd is
PID 1's only child (`--init` reaps what deploy's supervisor leaves), with a host key and an
authorized key the test made. There is no systemd in these containers: deploy supervises.
"""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .agent_containers import DOCKER, FleetError, _docker

IMAGE = "polyarch-test/ssh-host:2"
# /etc files sshd, the loader and the shell need, copied from the machine into the image
_ETC_FILES = ("passwd", "group", "nsswitch.conf", "ld.so.cache", "ld.so.conf", "hostname")
_ETC_TREES = ("ld.so.conf.d", "alternatives")
# /sbin is a folder, not the merged-/usr link: docker puts its init there (--init)
_DIRS = ("etc", "tmp", "var", "var/lib", "var/log", "var/tmp", "run", "run/sshd", "proc",
         "sys", "dev", "root", "opt", "usr", "sbin", "etc/ssh-test")  # fmt: skip
_LINKS = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64"}
SSHD_CONFIG = """Port 22
HostKey /etc/ssh-test/host_ed25519
AuthorizedKeysFile /etc/ssh-test/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile /run/sshd.pid
Subsystem sftp internal-sftp
"""


def _image_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in _DIRS:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name in ("tmp", "var/tmp") else 0o755
            tar.addfile(info)
        for name, target in _LINKS.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name in _ETC_FILES:
            if Path("/etc", name).exists():
                tar.add(f"/etc/{name}", f"etc/{name}")
        for tree in _ETC_TREES:
            tar.add(f"/etc/{tree}", f"etc/{tree}")
        users = [line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines()]
        shadow = "".join(f"{user}:*:19000:0:99999:7:::\n" for user in users if user)
        info = tarfile.TarInfo("etc/shadow")
        info.size, info.mode = len(shadow), 0o640
        tar.addfile(info, io.BytesIO(shadow.encode()))
    return buffer.getvalue()


def ensure_ssh_host_image() -> str:
    if _docker("image", "inspect", IMAGE, check=False).returncode == 0:
        return IMAGE
    done = subprocess.run([DOCKER, "import", "-", IMAGE], input=_image_tar(),
                          capture_output=True, timeout=120, check=False)  # fmt: skip
    if done.returncode != 0:
        raise FleetError(f"docker import of {IMAGE} failed: {done.stderr.decode()}")
    return IMAGE


def ssh_keygen(path: Path) -> str:
    """A fresh ed25519 key pair at `path`; returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    return Path(f"{path}.pub").read_text().strip()


@dataclass
class SshHost:
    """One sshd container: its name in the inventory, its address and public host key."""

    name: str
    container: str
    address: str
    host_key: str

    def exec(self, command: str) -> subprocess.CompletedProcess[str]:
        """A command in the container, by docker exec: the test's own view, not deploy's."""
        return subprocess.run([DOCKER, "exec", self.container, "sh", "-c", command],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    def known_hosts_line(self) -> str:
        return f"{self.address} {' '.join(self.host_key.split()[:2])}"


@contextmanager
def running_ssh_hosts(
    work_dir: Path, network: str, names: list[str]
) -> Iterator[tuple[list[SshHost], Path]]:
    """Starts one sshd container per name on `network`; yields them and the client key (its
    public half authorised on every host). Containers are removed by id afterwards."""
    ensure_ssh_host_image()
    work_dir.mkdir(parents=True, exist_ok=True)
    client_key = work_dir / "id_ed25519"
    authorized = ssh_keygen(client_key)
    hosts: list[SshHost] = []
    with ExitStack() as cleanup:
        for name in names:
            conf = work_dir / f"sshd-{name}"
            conf.mkdir()
            host_key = ssh_keygen(conf / "host_ed25519")
            (conf / "authorized_keys").write_text(authorized + "\n")
            (conf / "sshd_config").write_text(SSHD_CONFIG)
            os.chmod(conf / "host_ed25519", 0o600)
            container = _docker(
                "run", "-d", "--init", "--network", network, "--label", "polyarch-test=ssh-host",
                "--name", f"polyarch-test-ssh-{name}-{secrets.token_hex(3)}",
                "-v", "/usr:/usr:ro", "-v", "/var/run/docker.sock:/var/run/docker.sock",
                "-v", f"{conf}:/etc/ssh-test:ro", IMAGE,
                "/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh-test/sshd_config",
            ).stdout.strip()  # fmt: skip
            cleanup.callback(_docker, "rm", "-f", container, check=False)
            address = _docker(
                "inspect", "--format",
                f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}', container,
            ).stdout.strip()  # fmt: skip
            hosts.append(SshHost(name, container, address, host_key))
        yield hosts, client_key

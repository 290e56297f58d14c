"""An SSH host that runs systemd as PID 1: a Debian VM booted under QEMU for deploy tests.

Containers here cannot run systemd (no privileged containers) and must not touch the machine's
binfmt_misc, so the host that proves deploy's systemd path and `--with-qemu` is a whole
machine: deploy/dev/systemd-host-image.sh's disk, booted with its own kernel under QEMU's
software emulation (TCG; this machine's nested KVM does not boot a kernel), on QEMU's user
network. The test reaches it only through a port forwarded on 127.0.0.1; the guest reaches the
host's loopback as 10.0.2.2 and the test's docker network through QEMU's NAT. Each run boots
from a throwaway overlay of the cached disk and gets its own host key and authorised key from a
seed disk. The VM is stopped by its PID.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .agent_containers import free_port
from .poll import wait_until
from .services import REPO_ROOT, stop_process
from .ssh_hosts import ssh_keygen

IMAGE_SCRIPT = REPO_ROOT / "deploy" / "dev" / "systemd-host-image.sh"
IMAGE_TIMEOUT = 900.0
BOOT_TIMEOUT = 240.0  # software emulation: ~15 s here, but a loaded CI machine is slower
# the guest's view of the host's 127.0.0.1 on QEMU's user network
HOST_LOOPBACK = "10.0.2.2"


class SystemdHostError(RuntimeError):
    """The systemd host could not be made or booted; the message says what failed."""


def systemd_host_image() -> Path:
    """The cached disk folder (disk.img, vmlinuz, initrd.img), made on first use."""
    done = subprocess.run(["bash", str(IMAGE_SCRIPT)], capture_output=True, text=True,
                          timeout=IMAGE_TIMEOUT, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemdHostError(f"{IMAGE_SCRIPT.name} failed: {done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _seed_script(forwards: Sequence[int]) -> str:
    """Runs in the guest at boot, before sshd: keys in place, loopback forwards queued.

    A forward (started without waiting: it runs once boot reaches it) makes the guest's
    127.0.0.1:PORT the host's, so image references naming the test registry on 127.0.0.1
    mean the same registry inside the guest."""
    lines = [
        "install -m 600 /run/seed/host_ed25519 /etc/ssh/ssh_host_ed25519_key",
        "install -m 644 /run/seed/host_ed25519.pub /etc/ssh/ssh_host_ed25519_key.pub",
        "install -d -m 700 /root/.ssh",
        "install -m 600 /run/seed/authorized_keys /root/.ssh/authorized_keys",
    ]
    for port in forwards:
        lines.append(
            f"systemd-run --no-block --unit=loopback-forward-{port} socat "
            f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr TCP:{HOST_LOOPBACK}:{port}"
        )
    return "\n".join(lines) + "\n"


@dataclass
class SystemdHost:
    """The booted VM: its name in the inventory, the forwarded SSH port and its host key."""

    name: str
    port: int
    host_key: str
    client_key: Path
    known_hosts: Path
    console: Path
    address: str = "127.0.0.1"

    def ssh_command(self, command: str) -> list[str]:
        return ["ssh", "-q", "-p", str(self.port), "-i", str(self.client_key),
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
                f"root@{self.address}", command]  # fmt: skip

    def exec(self, command: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """A command on the host through OpenSSH's client: the test's own view, not deploy's."""
        return subprocess.run(self.ssh_command(command), capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip

    def known_hosts_line(self) -> str:
        return f"[{self.address}]:{self.port} {' '.join(self.host_key.split()[:2])}"

    def console_tail(self, chars: int = 3000) -> str:
        return self.console.read_text(errors="replace")[-chars:] if self.console.exists() else ""


@contextmanager
def running_systemd_host(
    work_dir: Path, name: str, forwards: Sequence[int] = (), memory_mb: int = 1536
) -> Iterator[SystemdHost]:
    """Boots the VM (2 CPUs) and yields it once sshd answers; `forwards` are host loopback
    ports the guest's loopback reaches too. Stopped by PID afterwards, overlay deleted."""
    image = systemd_host_image()
    work_dir.mkdir(parents=True, exist_ok=True)
    seed = work_dir / "seed"
    seed.mkdir()
    client_key = work_dir / "id_ed25519"
    (seed / "authorized_keys").write_text(ssh_keygen(client_key) + "\n")
    host_key = ssh_keygen(seed / "host_ed25519")
    (seed / "seed.sh").write_text(_seed_script(forwards))
    seed_disk, overlay = work_dir / "seed.img", work_dir / "overlay.qcow2"
    for command in (
        ["mkfs.ext4", "-q", "-F", "-d", str(seed), str(seed_disk), "4M"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
         str(image / "disk.img"), str(overlay)],
    ):  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise SystemdHostError(f"{shlex.join(command)} failed: {done.stderr}")
    port = free_port("127.0.0.1")
    host = SystemdHost(name, port, host_key, client_key, work_dir / "known_hosts",
                       work_dir / "console.log")  # fmt: skip
    host.known_hosts.write_text(host.known_hosts_line() + "\n")
    command = [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-smp", "2", "-m", str(memory_mb),
        "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
        "-append", "root=/dev/vda rw console=ttyS0 panic=-1",
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-drive", f"file={seed_disk},if=virtio,format=raw,readonly=on",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-serial", f"file:{host.console}", "-display", "none", "-monitor", "none",
        "-no-reboot",
    ]  # fmt: skip
    log = (work_dir / "qemu.log").open("wb")
    vm = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:

        def answers() -> bool:
            if vm.poll() is not None:
                raise SystemdHostError(
                    f"QEMU exited with {vm.returncode}: "
                    f"{(work_dir / 'qemu.log').read_text()[-2000:]}{host.console_tail()}"
                )
            return host.exec("systemctl is-system-running --wait", timeout=60).returncode in (0, 1)

        wait_until(answers, timeout=BOOT_TIMEOUT, interval=1.0,
                   message=f"the systemd host's sshd on 127.0.0.1:{port}")  # fmt: skip
        yield host
    finally:
        stop_process(vm)
        log.close()
        overlay.unlink(missing_ok=True)

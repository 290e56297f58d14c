#!/usr/bin/env bash
# Builds the disk of the deploy tests' systemd host: a Debian bookworm machine that boots its
# own kernel under QEMU (tests/support/systemd_host.py), with systemd as PID 1, sshd, python3,
# buildah as an operator installs it for an agent (crun to run RUN steps, netavark and iptables
# for their network: without iptables every RUN fails with "netavark: No such file or
# directory") and qemu-user-static with binfmt-support. Its QEMU handlers are NOT registered at boot (systemd-binfmt masked,
# binfmt-support not enabled): `polyarch deploy install --with-qemu` is what registers them.
#
#   usage: systemd-host-image.sh
#   stdout: the folder holding disk.img (ext4, raw), vmlinuz and initrd.img
#
# Per-run settings (host key, authorised key, port forwards) come from a second disk the test
# makes: at boot seed-disk.service mounts /dev/vdb and runs its seed.sh before sshd.
# Made without pulling anything and without mounting: mmdebstrap into a folder, mkfs.ext4 -d.
# Cached under /var/cache/polyarch/systemd-host keyed by everything that goes into it; a
# rerun prints the folder at once. Needs root and deploy/dev/bootstrap.sh; x86_64 only.
set -euo pipefail

log() { printf 'systemd-host-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -eq 0 ]] || { echo "usage: $0" >&2; exit 2; }
[[ $(uname -m) == x86_64 ]] || die "only x86_64 machines are supported (the guest is amd64)"
command -v mmdebstrap >/dev/null || die "mmdebstrap not installed (run deploy/dev/bootstrap.sh)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not installed (e2fsprogs)"

SUITE=bookworm
MIRROR="${POLYARCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${POLYARCH_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
include=systemd,systemd-sysv,udev,kmod,openssh-server,python3,linux-image-cloud-amd64
include+=,buildah,crun,netavark,iptables,qemu-user-static,binfmt-support,socat,iproute2,e2fsprogs
sources=(
    "deb ${MIRROR} ${SUITE} main"
    "deb ${MIRROR} ${SUITE}-updates main"
    "deb ${SECURITY} ${SUITE}-security main"
)
DISK_SIZE=4G
# Everything that changes the disk; bump v1 when the recipe below changes.
key=$(printf '%s\n' v1 "$SUITE" "$include" "$DISK_SIZE" "${sources[@]}" | sha256sum | cut -c1-16)
CACHE="${POLYARCH_CACHE_DIR:-/var/cache/polyarch}/systemd-host"
out="${CACHE}/${key}"
if [[ -f ${out}/disk.img ]]; then
    echo "$out"
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"${CACHE}/${key}.lock"
flock -w 900 9 || die "timed out waiting for ${CACHE}/${key}.lock"
if [[ -f ${out}/disk.img ]]; then  # made while we waited
    echo "$out"
    exit 0
fi

started=$SECONDS
work=$(mktemp -d "${CACHE}/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
root="${work}/root"
log "mmdebstrap ${SUITE}: ${include}"
# </dev/null: without a tty on stdin mmdebstrap would read sources from it. The hook's "$1" is
# the chroot, expanded by the hook's own shell, not here.
# shellcheck disable=SC2016
mmdebstrap --quiet --format=directory --variant=minbase --include="$include" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$SUITE" "$root" "${sources[@]}" </dev/null >&2 || die "mmdebstrap failed"

# --- the machine: fixed address on QEMU's user network, root on the first disk
echo polyarch-systemd-host >"${root}/etc/hostname"
echo "/dev/vda / ext4 defaults 0 1" >"${root}/etc/fstab"
cat >"${root}/etc/systemd/network/10-qemu-user.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
LinkLocalAddressing=no
EOF
wants="${root}/etc/systemd/system"
mkdir -p "${wants}/multi-user.target.wants" "${wants}/sysinit.target.wants"
ln -sf /lib/systemd/system/systemd-networkd.service \
    "${wants}/multi-user.target.wants/systemd-networkd.service"

# --- QEMU handlers installed but not registered at boot: --with-qemu's job
ln -sf /dev/null "${wants}/systemd-binfmt.service"
rm -f "${wants}/multi-user.target.wants/binfmt-support.service"

# --- quiet: nothing in the guest reaches for the network or spends the emulated CPU
for timer in apt-daily apt-daily-upgrade dpkg-db-backup e2scrub_all fstrim; do
    rm -f "${wants}/timers.target.wants/${timer}.timer"
done

# --- per-run settings from the seed disk; host keys come only from there
rm -f "${root}"/etc/ssh/ssh_host_*
cat >"${wants}/seed-disk.service" <<'EOF'
[Unit]
Description=Per-run host key, authorised key and port forwards from the seed disk
DefaultDependencies=no
After=local-fs.target
Before=ssh.service sysinit.target
ConditionPathExists=/dev/vdb

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'mkdir -p /run/seed && mount -o ro /dev/vdb /run/seed && sh -e /run/seed/seed.sh'

[Install]
WantedBy=sysinit.target
EOF
ln -sf /etc/systemd/system/seed-disk.service \
    "${wants}/sysinit.target.wants/seed-disk.service"

# --- the boot files beside the disk (QEMU boots the kernel directly, no boot loader)
staging="${work}/out"
mkdir -p "$staging"
cp "${root}"/boot/vmlinuz-* "${staging}/vmlinuz"
cp "${root}"/boot/initrd.img-* "${staging}/initrd.img"
mkfs.ext4 -q -F -L root -d "$root" "${staging}/disk.img" "$DISK_SIZE" \
    || die "mkfs.ext4 -d failed"
rm -rf "$out"
mv "$staging" "$out"
log "made ${out} in $((SECONDS - started))s"
echo "$out"

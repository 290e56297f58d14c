#!/usr/bin/env bash
# Prepares a Debian 12 machine (root, no systemd needed) for polyarch development
# and CI: system packages, foreign dpkg architectures, QEMU binfmt handlers,
# containers registries drop-in, and the project's Python venv.
# Idempotent: every step checks what is already there, so a rerun takes seconds.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${REPO_ROOT}/.venv"
PYTHON="${POLYARCH_PYTHON:-python3}"

PACKAGES=(
    docker.io buildah qemu-user-static binfmt-support docker-registry skopeo
    openssh-server iproute2 apache2-utils
    # buildah falls back to fuse-overlayfs where the kernel overlay can't be used;
    # uidmap gives it newuidmap/newgidmap.
    fuse-overlayfs uidmap
    # venv needs ensurepip, which Debian ships separately from python3.
    python3 python3-venv
    # base-image.sh uses apt-get download + dpkg -x; flock serialises it.
    ca-certificates util-linux
    # deploy/docker/python-base.sh: a Debian rootfs per architecture, no image pull.
    mmdebstrap
    # deploy/dev/check.sh lints the shell scripts.
    shellcheck
    # prometheus + promtool: tests check deploy/prometheus/ and scrape a real farm.
    prometheus
    # systemd-analyze: tests verify deploy/systemd/'s units (PID 1 need not be systemd).
    systemd
    # tests start a throwaway PostgreSQL server (the PostgreSQL StateStore's contract tests).
    postgresql
    # deploy's systemd host: a Debian VM under QEMU (systemd-host-image.sh makes its disk
    # with mkfs.ext4 -d; qemu-img makes each run's overlay).
    qemu-system-x86 qemu-utils e2fsprogs
)
FOREIGN_ARCHES=(arm64 armhf)
QEMU_HANDLERS=(qemu-aarch64 qemu-arm)

log() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

started=$SECONDS
[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, mounts binfmt_misc)"
export DEBIAN_FRONTEND=noninteractive

# --- dpkg architectures: base-image.sh downloads busybox-static for arm64/armhf.
need_update=0
current_foreign=" $(dpkg --print-foreign-architectures | tr '\n' ' ') "
for arch in "${FOREIGN_ARCHES[@]}"; do
    if [[ $current_foreign != *" ${arch} "* ]]; then
        log "adding dpkg architecture ${arch}"
        dpkg --add-architecture "$arch"
        need_update=1
    fi
    # Package lists for the foreign arch exist only after an apt-get update.
    if ! compgen -G "/var/lib/apt/lists/*_binary-${arch}_Packages*" >/dev/null; then
        need_update=1
    fi
done

# --- packages
missing=()
for pkg in "${PACKAGES[@]}"; do
    if [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true) != ii* ]]; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]} > 0)); then
    need_update=1
fi
if ((need_update)); then
    # Mirrors are sometimes caught mid-sync (size/hash mismatch on one index);
    # retry, and if one index still fails carry on: the install below fails
    # loudly if anything we need is really unavailable.
    for attempt in 1 2 3; do
        log "apt-get update (attempt ${attempt})"
        if apt-get -o Acquire::Retries=3 update -q; then
            break
        fi
        if ((attempt == 3)); then
            log "warning: apt-get update reported errors; continuing with the lists it got"
        else
            sleep $((attempt * 5))
        fi
    done
fi
if ((${#missing[@]} > 0)); then
    log "installing: ${missing[*]}"
    # Keep package scripts from starting daemons (docker, sshd) behind our back:
    # dockerd.sh starts dockerd itself and tracks its PID. policy-rc.d exit 101
    # is Debian's documented "action forbidden" answer to invoke-rc.d.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    rc=0
    apt-get install -y -q "${missing[@]}" || rc=$?
    if ((made_policy)); then rm -f "$policy"; fi
    ((rc == 0)) || die "apt-get install failed (exit ${rc})"
else
    log "all packages present"
fi

# --- QEMU user-mode emulation through binfmt_misc
binfmt=/proc/sys/fs/binfmt_misc
if [[ ! -e ${binfmt}/status ]]; then
    log "mounting binfmt_misc"
    mount -t binfmt_misc binfmt_misc "$binfmt"
fi
update-binfmts --enable >/dev/null
for handler in "${QEMU_HANDLERS[@]}"; do
    entry="${binfmt}/${handler}"
    [[ -r $entry ]] || die "${entry} missing after update-binfmts --enable (is qemu-user-static installed?)"
    [[ $(head -n1 "$entry") == enabled ]] || die "${entry} is registered but not enabled"
    # F (fix-binary) makes the kernel open the interpreter now, so it also works
    # inside containers whose rootfs has no qemu binary.
    grep -Eq '^flags: [A-Z]*F' "$entry" || die "${entry} lacks the F flag; containers can't use it"
done
log "binfmt: ${QEMU_HANDLERS[*]} enabled"

# --- containers/image registries drop-in (buildah, skopeo).
# Every polyarch call passes --tls-verify=false for loopback registries, so this
# file is a convenience for people typing buildah/skopeo by hand. Note that an
# entry without a port does not reliably cover random test ports (the prefix
# match that makes "127.0.0.1" match "127.0.0.1:5000" is documented upstream as
# unintended), which is exactly why the scripts don't depend on it.
dropin=/etc/containers/registries.conf.d/50-polyarch-loopback.conf
mkdir -p "$(dirname "$dropin")"
dropin_text='# Written by polyarch deploy/dev/bootstrap.sh: plain-HTTP loopback registries
# for development. polyarch itself passes --tls-verify=false and does not rely on this.
[[registry]]
location = "127.0.0.1"
insecure = true

[[registry]]
location = "localhost"
insecure = true
'
if [[ ! -f $dropin ]] || [[ $(cat "$dropin") != "${dropin_text%$'\n'}" ]]; then
    printf '%s' "$dropin_text" >"$dropin"
    log "wrote ${dropin}"
fi

# --- Python venv with the project installed editable (strict: a link tree under
# build/, so only the declared packages are importable).
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "${PYTHON} is older than 3.11 (set POLYARCH_PYTHON)"
if ! "${VENV}/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "creating ${VENV} with $("$PYTHON" --version)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # Debian's bundled pip (23.0) predates some editable-install fixes; take a current one.
    "${VENV}/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
fi
# Strict editable installs only link files that existed at install time, so the
# stamp covers pyproject.toml and the list of package files, not just pyproject.
stamp="${VENV}/.polyarch-install-stamp"
want_stamp=$(
    cd "$REPO_ROOT"
    {
        sha256sum pyproject.toml
        find coordinator agent client proto ops -type f \
            \( -name '*.py' -o -name '*.pyi' -o -name '*.proto' -o -name py.typed \) \
            -not -path '*/__pycache__/*' | LC_ALL=C sort
    } | sha256sum | cut -d' ' -f1
)
if [[ ! -f $stamp ]] || [[ $(cat "$stamp") != "$want_stamp" ]]; then
    log "pip install -e .[dev]"
    (
        cd "$REPO_ROOT"
        "${VENV}/bin/python" -m pip install -q --disable-pip-version-check \
            -e '.[dev]' --config-settings editable_mode=strict
    )
    printf '%s\n' "$want_stamp" >"$stamp"
else
    log "venv up to date"
fi

log "done in $((SECONDS - started))s"

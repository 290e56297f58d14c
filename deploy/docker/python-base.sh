#!/usr/bin/env bash
# Builds a multi-arch (linux/amd64, linux/arm64) Debian bookworm minbase + python3
# base image without pulling anything: mmdebstrap makes one rootfs tar per
# architecture (QEMU binfmt runs the foreign package scripts), buildah turns each
# into a FROM-scratch image, and a manifest list joins them and is pushed.
#
#   usage: python-base.sh REGISTRY_ADDR [REPO[:TAG]]
#   default reference: REGISTRY_ADDR/polyarch/python-base:bookworm
#   env:   PYTHON_BASE_INCLUDE   extra Debian packages, comma-separated (agent-base.sh
#                                adds buildah this way); part of the cache key
#          POLYARCH_DEBIAN_MIRROR, POLYARCH_DEBIAN_SECURITY   mirror URLs
#
# The only stdout line is the pushed reference. Rootfs tars are cached under
# /var/cache/polyarch/python-base keyed by everything that goes into them, and
# the per-arch images stay in buildah's storage labelled with that key, so a
# rerun only pushes (seconds). Kept small: minbase, merged /usr without the
# usrmerge package (which pulls in perl), no docs/man/locales, no apt lists.
# venv without pip works on this base (python3 -m venv --without-pip); pip
# comes from the wheelhouse, so python3-venv is not needed. Needs root and
# deploy/dev/bootstrap.sh.
set -euo pipefail

usage() { echo "usage: $0 REGISTRY_ADDR [REPO[:TAG]]" >&2; exit 2; }
log() { printf 'python-base: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || usage
registry=$1
repo_tag=${2:-polyarch/python-base:bookworm}
[[ $registry =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] || die "REGISTRY_ADDR must be host:port, got '${registry}'"
# A ':' after the last '/' is a tag; without one, tag latest.
if [[ ${repo_tag##*/} != *:* ]]; then repo_tag="${repo_tag}:latest"; fi
ref="${registry}/${repo_tag}"
command -v mmdebstrap >/dev/null || die "mmdebstrap not installed (run deploy/dev/bootstrap.sh)"

SUITE=bookworm
MIRROR="${POLYARCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${POLYARCH_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
include="python3${PYTHON_BASE_INCLUDE:+,${PYTHON_BASE_INCLUDE}}"
[[ $include =~ ^[a-z0-9.+,-]+$ ]] || die "PYTHON_BASE_INCLUDE must be comma-separated package names"
# Fixed file times in the tar (mmdebstrap honours it), so one package set gives one tar.
export SOURCE_DATE_EPOCH=1700000000

CACHE="${POLYARCH_CACHE_DIR:-/var/cache/polyarch}"
ROOTFS="${CACHE}/python-base"
# Local buildah names, all with the cache key in them; the per-key lock below keeps concurrent
# runs of one package set from fighting over them, while different sets (python-base.sh and
# agent-base.sh) build side by side.
LOCAL="localhost/polyarch-python-base"

# dpkg arch = OCI arch for both platforms we ship.
ARCHES=(amd64 arm64)

# Written into the image as well (dpkg.cfg.d), so derived images stay small too.
dpkg_opts=(
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-include=/usr/share/locale/locale.alias'
)
sources=(
    "deb ${MIRROR} ${SUITE} main"
    "deb ${MIRROR} ${SUITE}-updates main"
    "deb ${SECURITY} ${SUITE}-security main"
)
# Everything that changes the rootfs; bump v1 when the recipe below changes.
key=$(printf '%s\n' v1 "$SUITE" "$include" "${dpkg_opts[@]}" "${sources[@]}" \
    | sha256sum | cut -c1-16)

started=$SECONDS
mkdir -p "$ROOTFS"
lock="${CACHE}/python-base-${key}.lock"
exec 9>"$lock"
flock -w 900 9 || die "timed out waiting for ${lock}"

work=$(mktemp -d)
containers=()
# This run's manifest list: a fresh one each run, so it never holds stale entries.
list="${LOCAL}:${key}-index-$$"
cleanup() {
    local c
    for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
    buildah manifest rm "$list" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

make_rootfs() {
    local arch=$1 tar=$2
    # $1 is the chroot, expanded by the hook's own shell, not here.
    # shellcheck disable=SC2016
    local cleanup_hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin'
    log "mmdebstrap ${SUITE} ${include} for ${arch} (foreign arches run under QEMU)"
    # </dev/null: without a tty on stdin mmdebstrap would read sources from it.
    mmdebstrap --quiet --format=tar --variant=minbase --arch="$arch" --include="$include" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        "${dpkg_opts[@]}" \
        --customize-hook="$cleanup_hook" \
        "$SUITE" "${tar}.partial" "${sources[@]}" </dev/null >&2 \
        || die "mmdebstrap failed for ${arch}"
    mv "${tar}.partial" "$tar"
}

# --- missing rootfs tars, made side by side: the emulated arch is bound by QEMU on one core,
# so the native one costs almost nothing next to it.
pids=()
for arch in "${ARCHES[@]}"; do
    tar="${ROOTFS}/rootfs-${key}-${arch}.tar"
    if ! buildah inspect --type image "${LOCAL}:${key}-${arch}" >/dev/null 2>&1 && [[ ! -f $tar ]]; then
        make_rootfs "$arch" "$tar" &
        pids+=($!)
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || die "a rootfs build failed (see above)"
done

# --- one image per architecture, rebuilt only when its rootfs key changed
for arch in "${ARCHES[@]}"; do
    tar="${ROOTFS}/rootfs-${key}-${arch}.tar"
    image="${LOCAL}:${key}-${arch}"
    if buildah inspect --type image "$image" >/dev/null 2>&1; then
        log "reusing ${image}"
        continue
    fi
    ctr=$(buildah from --quiet --arch "$arch" --os linux scratch)
    containers+=("$ctr")
    buildah add --quiet "$ctr" "$tar" / >/dev/null
    buildah config --arch "$arch" --os linux \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 \
        --cmd python3 \
        --label org.opencontainers.image.description="polyarch Python base (Debian ${SUITE} minbase: ${include})" \
        --label io.polyarch.rootfs-key="$key" \
        "$ctr"
    # OCI locally with a fixed timestamp, as base-image.sh: same rootfs, same digests.
    buildah commit --quiet --rm --format oci --timestamp 0 "$ctr" "$image" >/dev/null
    unset 'containers[-1]'
    log "built ${image}"
done

# --- the manifest list
buildah manifest create "$list" >/dev/null
for arch in "${ARCHES[@]}"; do
    buildah manifest add --os linux --arch "$arch" "$list" "${LOCAL}:${key}-${arch}" >/dev/null
done
# v2s2, as base-image.sh: every client we use (docker 20.10, BuildKit, buildah) takes it.
buildah manifest push --quiet --all --format v2s2 --tls-verify=false \
    --digestfile "${work}/digest" "$list" "docker://${ref}" >&2
log "pushed ${ref}@$(<"${work}/digest")"

# --- verify what the registry actually holds, with an independent client.
skopeo inspect --raw --tls-verify=false "docker://${ref}" >"${work}/index.json"
python3 - "${work}/index.json" <<'EOF' || die "pushed index does not list the expected platforms"
import json, sys
index = json.load(open(sys.argv[1]))
found = sorted(f"{m['platform']['os']}/{m['platform']['architecture']}" for m in index["manifests"])
if found != ["linux/amd64", "linux/arm64"]:
    sys.exit(f"index platforms {found}, want linux/amd64 and linux/arm64")
EOF
log "verified linux/amd64 linux/arm64 in $((SECONDS - started))s"
echo "$ref"

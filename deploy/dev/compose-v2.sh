#!/usr/bin/env bash
# Docker Compose v2 for the compose farm's test, from Debian's own packages: bookworm ships
# only compose v1 (1.29, which ignores `configs:` and refuses `name:`), so this takes
# trixie's docker-compose .deb (a Go binary needing only libc 2.34+, which bookworm has)
# through a private apt state: the machine's apt sources and package database stay as they
# are, nothing is installed.
#
#   usage: compose-v2.sh
#   stdout: the path of the docker-compose binary (cached under /var/cache/polyarch/compose)
set -euo pipefail

log() { printf 'compose-v2: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -eq 0 ]] || { echo "usage: $0" >&2; exit 2; }
MIRROR="${POLYARCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie
CACHE="${POLYARCH_CACHE_DIR:-/var/cache/polyarch}/compose"
binary="${CACHE}/docker-compose"
if [[ -x $binary ]]; then
    echo "$binary"
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"${CACHE}.lock"
flock -w 300 9 || die "timed out waiting for ${CACHE}.lock"
if [[ -x $binary ]]; then
    echo "$binary"
    exit 0
fi

arch=$(dpkg --print-architecture)
work=$(mktemp -d "${CACHE}/.fetch-XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "${work}/lists/partial" "${work}/cache/archives/partial"
echo "deb ${MIRROR} ${SUITE} main" >"${work}/sources.list"
apt_opts=(
    -o "Dir::Etc::SourceList=${work}/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=${work}/lists" -o "Dir::Cache=${work}/cache"
    -o "APT::Architecture=${arch}" -o "APT::Architectures=${arch}"
)
log "fetching docker-compose from Debian ${SUITE}"
apt-get -q "${apt_opts[@]}" update >&2 || die "apt-get update of ${SUITE} failed"
(cd "$work" && apt-get -q "${apt_opts[@]}" download docker-compose >&2) \
    || die "apt-get download docker-compose failed"
deb=$(compgen -G "${work}/docker-compose_*.deb") || die "no docker-compose .deb was downloaded"
dpkg-deb -x "$deb" "${work}/root"
found=$(find "${work}/root" -type f -name docker-compose -perm -u+x | head -n 1)
[[ -n $found ]] || die "no docker-compose binary in ${deb##*/}"
version=$("$found" version --short 2>/dev/null) || die "${found#"${work}"/root} does not run here"
[[ $version == 2.* ]] || die "expected compose v2, got ${version}"
install -m 0755 "$found" "$binary"
log "docker-compose ${version} at ${binary}"
echo "$binary"

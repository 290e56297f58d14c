#!/usr/bin/env bash
# Builds a multi-arch busybox base image (linux/amd64, linux/arm64, linux/arm/v7)
# without pulling anything: Debian's busybox-static .debs go into per-arch
# images built FROM scratch with buildah, joined by a manifest list and pushed.
#
#   usage: base-image.sh REGISTRY_ADDR [REPO[:TAG]]
#   default reference: REGISTRY_ADDR/polyarch/busybox:latest
#
# The only stdout line is the pushed reference. Layers and configs are
# byte-for-byte reproducible (fixed mtimes, owners, created timestamp), so
# reruns give the same digests. Needs root and deploy/dev/bootstrap.sh.
set -euo pipefail

usage() { echo "usage: $0 REGISTRY_ADDR [REPO[:TAG]]" >&2; exit 2; }
log() { printf 'base-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || usage
registry=$1
repo_tag=${2:-polyarch/busybox:latest}
[[ $registry =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] || die "REGISTRY_ADDR must be host:port, got '${registry}'"
# A ':' after the last '/' is a tag; without one, tag latest.
if [[ ${repo_tag##*/} != *:* ]]; then repo_tag="${repo_tag}:latest"; fi
ref="${registry}/${repo_tag}"

CACHE="${POLYARCH_CACHE_DIR:-/var/cache/polyarch}"
DEBS="${CACHE}/debs"
# Local buildah names; the lock below keeps concurrent runs from fighting over them.
LOCAL="localhost/polyarch-base-image/busybox"

# platform triples: dpkg arch, OCI arch, OCI variant (may be empty)
PLATFORMS=(
    "amd64 amd64 -"
    "arm64 arm64 -"
    "armhf arm v7"
)

started=$SECONDS
mkdir -p "$DEBS"
exec 9>"${CACHE}/base-image.lock"
flock -w 600 9 || die "timed out waiting for ${CACHE}/base-image.lock"

work=$(mktemp -d)
containers=()
cleanup() {
    local c
    for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# --- fetch the .debs once; reruns use the cache.
cached_deb() {
    # Newest cached busybox-static for dpkg arch $1, if any.
    find "$DEBS" -maxdepth 1 -name "busybox-static_*_${1}.deb" | sort -V | tail -n1
}
fetch_debs() {
    # apt-get download writes into the current directory. Sandbox user root:
    # the _apt user may not be able to write the cache directory.
    (cd "$DEBS" && apt-get -q -o APT::Sandbox::User=root download "$@") >&2
}
wanted=()
for p in "${PLATFORMS[@]}"; do
    read -r dpkg_arch _ _ <<<"$p"
    [[ -n $(cached_deb "$dpkg_arch") ]] || wanted+=("busybox-static:${dpkg_arch}")
done
if ((${#wanted[@]} > 0)); then
    log "downloading ${wanted[*]} into ${DEBS}"
    if ! fetch_debs "${wanted[@]}"; then
        # Stale package lists point at superseded versions: refresh once, retry.
        log "download failed; apt-get update and retry"
        apt-get -q update >&2 || log "warning: apt-get update reported errors"
        fetch_debs "${wanted[@]}" \
            || die "apt-get download failed (are arm64/armhf added? run deploy/dev/bootstrap.sh)"
    fi
fi

# --- applet list from the native busybox (same Debian version on every arch).
native_arch=$(dpkg --print-architecture)
native_deb=$(cached_deb "$native_arch")
if [[ -n $native_deb ]]; then
    dpkg -x "$native_deb" "${work}/native"
    mapfile -t applets < <("${work}/native/bin/busybox" --list-full)
else
    # Not on one of our three arches: a fixed list covers what tests use.
    applets=(bin/sh bin/ls bin/cat bin/echo bin/uname bin/sleep bin/true bin/false
        bin/mkdir bin/rm bin/cp bin/mv bin/env bin/grep bin/sed bin/touch bin/date)
fi
((${#applets[@]} > 0)) || die "no busybox applets found"

# --- one image per platform
images=()
for p in "${PLATFORMS[@]}"; do
    read -r dpkg_arch arch variant <<<"$p"
    [[ $variant == - ]] && variant=""
    deb=$(cached_deb "$dpkg_arch")
    rootfs="${work}/rootfs-${dpkg_arch}"
    mkdir -p "${work}/x-${dpkg_arch}" "${rootfs}/bin" "${rootfs}/etc" "${rootfs}/tmp" "${rootfs}/root"
    dpkg -x "$deb" "${work}/x-${dpkg_arch}"
    cp "${work}/x-${dpkg_arch}/bin/busybox" "${rootfs}/bin/busybox"
    for applet in "${applets[@]}"; do
        [[ $applet == bin/busybox ]] && continue
        mkdir -p "${rootfs}/$(dirname "$applet")"
        ln -sf /bin/busybox "${rootfs}/${applet}"
    done
    # Enough identity for USER/chown in test Dockerfiles.
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
        >"${rootfs}/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"${rootfs}/etc/group"
    chmod 1777 "${rootfs}/tmp"
    chmod 700 "${rootfs}/root"
    # Fixed order, owners and mtimes: the layer digest depends only on content.
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        -C "$rootfs" -cf "${work}/rootfs-${dpkg_arch}.tar" .

    from_args=(--arch "$arch" --os linux)
    [[ -n $variant ]] && from_args+=(--variant "$variant")
    ctr=$(buildah from --quiet "${from_args[@]}" scratch)
    containers+=("$ctr")
    buildah add --quiet "$ctr" "${work}/rootfs-${dpkg_arch}.tar" / >/dev/null
    buildah config "${from_args[@]}" \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd sh \
        --label org.opencontainers.image.description="polyarch busybox test base (Debian busybox-static)" \
        "$ctr"
    image="${LOCAL}:${arch}${variant:+-${variant}}"
    # OCI locally: the docker format would record the random working-container
    # ID in the config and break reproducibility. The push converts to Docker.
    buildah commit --quiet --rm --format oci --timestamp 0 "$ctr" "$image" >/dev/null
    unset 'containers[-1]'
    images+=("$image|${arch}|${variant}")
    log "built ${image}"
done

# --- manifest list, rebuilt each run so it never holds stale entries.
list="${LOCAL}:index"
if buildah manifest exists "$list" 2>/dev/null; then
    buildah manifest rm "$list" >/dev/null
fi
buildah manifest create "$list" >/dev/null
for entry in "${images[@]}"; do
    IFS='|' read -r image arch variant <<<"$entry"
    add_args=(--os linux --arch "$arch")
    [[ -n $variant ]] && add_args+=(--variant "$variant")
    buildah manifest add "${add_args[@]}" "$list" "$image" >/dev/null
done
# v2s2: a Docker manifest list of Docker manifests, which every client we use
# (docker 20.10, BuildKit, buildah, skopeo) accepts.
buildah manifest push --quiet --all --format v2s2 --tls-verify=false \
    --digestfile "${work}/digest" "$list" "docker://${ref}" >&2
log "pushed ${ref}@$(<"${work}/digest")"

# --- verify what the registry actually holds, with an independent client.
skopeo inspect --raw --tls-verify=false "docker://${ref}" >"${work}/index.json"
python3 - "${work}/index.json" <<'EOF' || die "pushed index does not list the expected platforms"
import json, sys
index = json.load(open(sys.argv[1]))
found = sorted(
    "/".join(filter(None, (m["platform"]["os"], m["platform"]["architecture"],
                           m["platform"].get("variant"))))
    for m in index.get("manifests", [])
)
want = ["linux/amd64", "linux/arm/v7", "linux/arm64"]
if found != want:
    sys.exit(f"index platforms {found}, want {want}")
EOF
log "verified linux/amd64 linux/arm64 linux/arm/v7 in $((SECONDS - started))s"
echo "$ref"

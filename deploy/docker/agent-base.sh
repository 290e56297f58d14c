#!/usr/bin/env bash
# The agent image's base: python-base.sh's Debian bookworm minbase + python3 for linux/amd64
# and linux/arm64, with buildah, uidmap and libcap2-bin (rootless; agent.Dockerfile gives
# newuidmap/newgidmap file capabilities with setcap) and ca-certificates (registries over
# TLS) from Debian. Same contract, cache and offline reruns as python-base.sh, under its own
# cache key and reference.
#
#   usage: agent-base.sh REGISTRY_ADDR [REPO[:TAG]]
#   default reference: REGISTRY_ADDR/polyarch/agent-base:bookworm
set -euo pipefail
[[ $# -ge 1 && $# -le 2 ]] || { echo "usage: $0 REGISTRY_ADDR [REPO[:TAG]]" >&2; exit 2; }
# Without recommends (mmdebstrap's default): no fuse-overlayfs (kernel overlay is used),
# no crun/runc (RUN steps use chroot isolation), no slirp4netns.
export PYTHON_BASE_INCLUDE=buildah,uidmap,libcap2-bin,ca-certificates
exec bash "$(dirname "$0")/python-base.sh" "$1" "${2:-polyarch/agent-base:bookworm}"

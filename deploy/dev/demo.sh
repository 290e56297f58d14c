#!/usr/bin/env bash
# The main job on one machine: a local registry, a coordinator and two agents (docker/BuildKit
# and buildah, with QEMU for arm), then a 3-platform build of examples/hello, checked with
# `docker run --platform`. Stops everything it started (by PID) on exit.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"

bash deploy/dev/bootstrap.sh
bash deploy/dev/dockerd.sh start >/dev/null

# shellcheck source=deploy/dev/lib.sh
source deploy/dev/lib.sh
docker=${POLYARCH_DOCKER:-/usr/bin/docker}
POLYARCH=$repo_root/.venv/bin/polyarch
farm_work=$(mktemp -d /tmp/polyarch-demo.XXXXXX)
trap farm_cleanup EXIT

start_registry
echo "registry on $REGISTRY"
base=$(bash deploy/dev/base-image.sh "$REGISTRY" | tail -n 1)
echo "base image $base (built offline)"
start_farm "$docker"
"$POLYARCH" agents

image=$REGISTRY/demo/hello
start=$(date +%s.%N)
digest=$("$POLYARCH" build --platform linux/amd64,linux/arm64,linux/arm/v7 -t "$image:latest" \
  --build-arg "BASE=$base" --build-arg "BUILD_ID=$RANDOM$RANDOM" examples/hello)
end=$(date +%s.%N)
echo
echo "index digest: $digest"
printf 'build wall time: %.1f s\n' "$(echo "$end - $start" | bc)"
for platform in linux/amd64 linux/arm64 linux/arm/v7; do
  printf '%-14s uname -m: %s\n' "$platform" \
    "$("$docker" run --rm --pull always --platform "$platform" "$image:latest" 2>/dev/null)"
done

#!/usr/bin/env bash
# Side by side, in one run on this machine: the manual multi-arch workflow (docker build
# --platform + push per platform, then docker manifest create + push) against
# `polyarch build` on a local farm, for examples/hello on three platforms. Every round uses a
# fresh BUILD_ID build arg so neither side reuses the other's layer cache for the RUN step.
# Usage: bash bench/manual_vs_farm.sh [ROUNDS] [ITERATIONS]  (ITERATIONS: CPU work per RUN step)
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
rounds=${1:-3}
iterations=${2:-2000}

bash deploy/dev/bootstrap.sh >/dev/null
bash deploy/dev/dockerd.sh start >/dev/null
# shellcheck source=deploy/dev/lib.sh
source deploy/dev/lib.sh
docker=${POLYARCH_DOCKER:-/usr/bin/docker}
POLYARCH=$repo_root/.venv/bin/polyarch
farm_work=$(mktemp -d /tmp/polyarch-bench.XXXXXX)
trap farm_cleanup EXIT
start_registry
base=$(bash deploy/dev/base-image.sh "$REGISTRY" | tail -n 1)
start_farm "$docker"

platforms=(linux/amd64 linux/arm64 linux/arm/v7)
now() { date +%s.%N; }

manual_build() {
  local id=$1 image=$REGISTRY/bench/manual refs=() p slug
  for p in "${platforms[@]}"; do
    slug=${p//\//-}
    DOCKER_BUILDKIT=1 "$docker" build -q --platform "$p" --build-arg "BASE=$base" \
      --build-arg "BUILD_ID=$id" --build-arg "ITERATIONS=$iterations" -t "$image:$slug" \
      examples/hello >/dev/null
    "$docker" push -q "$image:$slug" >/dev/null
    refs+=("$image:$slug")
  done
  "$docker" manifest rm "$image:latest" >/dev/null 2>&1 || true
  "$docker" manifest create --insecure "$image:latest" "${refs[@]}" >/dev/null
  "$docker" manifest push --insecure "$image:latest" >/dev/null
}

farm_build() {
  "$POLYARCH" build --progress quiet --platform "$(IFS=,; echo "${platforms[*]}")" \
    -t "$REGISTRY/bench/farm:latest" --build-arg "BASE=$base" --build-arg "BUILD_ID=$1" \
    --build-arg "ITERATIONS=$iterations" examples/hello >/dev/null
}

echo "ITERATIONS=$iterations per RUN step"
printf '%-6s %10s %10s %7s\n' round manual_s farm_s ratio
total_manual=0
total_farm=0
for round in $(seq 1 "$rounds"); do
  t0=$(now); manual_build "m$round$RANDOM"; t1=$(now)
  farm_build "f$round$RANDOM"; t2=$(now)
  manual=$(echo "$t1 - $t0" | bc)
  farm=$(echo "$t2 - $t1" | bc)
  total_manual=$(echo "$total_manual + $manual" | bc)
  total_farm=$(echo "$total_farm + $farm" | bc)
  printf '%-6s %10.2f %10.2f %7.2f\n' "$round" "$manual" "$farm" "$(echo "$manual / $farm" | bc -l)"
done
printf '%-6s %10.2f %10.2f %7.2f\n' mean "$(echo "$total_manual / $rounds" | bc -l)" \
  "$(echo "$total_farm / $rounds" | bc -l)" "$(echo "$total_manual / $total_farm" | bc -l)"
echo "(ratio > 1: the farm is faster; agents: docker-1 and buildah-1 on this one machine)"

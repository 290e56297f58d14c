#!/usr/bin/env bash
# The farm's own overhead on one host (issue 11, goal 6), side by side in one run: the same
# Dockerfile for three platforms with the same builder, by hand
#   buildah build --jobs 3 --platform A,B,C --manifest M ... && buildah manifest push --all M
# and through polyarch with one buildah agent of 3 slots on this machine. Rounds alternate
# which side goes first; each uses a fresh BUILD_ID so no side reuses the other's RUN layer.
# Prints per-round times, the medians, their ratio, and where the farm's time went
# (bench/overhead_phases.py reads the build's own record).
# Usage: bash bench/overhead.sh [ROUNDS] [ITERATIONS]   (ITERATIONS: CPU work per RUN step)
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
rounds=${1:-5}
iterations=${2:-2000}

bash deploy/dev/bootstrap.sh >/dev/null

# shellcheck source=deploy/dev/lib.sh
source deploy/dev/lib.sh
POLYARCH=${POLYARCH:-$repo_root/.venv/bin/polyarch}  # another tree: a wrapper script
PYTHON=$repo_root/.venv/bin/python
farm_work=$(mktemp -d /tmp/polyarch-overhead.XXXXXX)
manifest=polyarch-overhead-$$
cleanup() {
  buildah manifest rm "$manifest" >/dev/null 2>&1 || true
  farm_cleanup
}
trap cleanup EXIT
start_registry
base=$(bash deploy/dev/base-image.sh "$REGISTRY" | tail -n 1)
start_coordinator
start_agent buildah-1 buildah 3
wait_for 60 agents_connected 1

platforms=linux/amd64,linux/arm64,linux/arm/v7
now() { date +%s.%N; }

by_hand() {
  buildah manifest rm "$manifest" >/dev/null 2>&1 || true
  buildah build --quiet --jobs 3 --platform "$platforms" --manifest "$manifest" \
    --build-arg "BASE=$base" --build-arg "BUILD_ID=$1" --build-arg "ITERATIONS=$iterations" \
    --tls-verify=false examples/hello >/dev/null
  buildah manifest push --quiet --all --tls-verify=false "$manifest" \
    "docker://$REGISTRY/bench/by-hand:latest" >/dev/null
}

through_farm() {
  "$POLYARCH" build --progress quiet --platform "$platforms" \
    -t "$REGISTRY/bench/farm:latest" --build-arg "BASE=$base" --build-arg "BUILD_ID=$1" \
    --build-arg "ITERATIONS=$iterations" --metadata-file "$farm_work/metadata-$1.json" \
    examples/hello >/dev/null
}

# a warm-up round of each, not counted: base image layers, QEMU start, page cache
by_hand "warm$RANDOM"
through_farm "warm$RANDOM"

echo "ITERATIONS=$iterations per RUN step; one buildah agent with 3 slots"
printf '%-6s %10s %10s %7s\n' round by_hand_s farm_s farm/hand
hand_times=()
farm_times=()
for round in $(seq 1 "$rounds"); do
  id="r$round$RANDOM"
  if ((round % 2)); then
    t0=$(now); by_hand "h$id"; t1=$(now); through_farm "f$id"; t2=$(now)
    hand=$(echo "$t1 - $t0" | bc); farm=$(echo "$t2 - $t1" | bc)
  else
    t0=$(now); through_farm "f$id"; t1=$(now); by_hand "h$id"; t2=$(now)
    farm=$(echo "$t1 - $t0" | bc); hand=$(echo "$t2 - $t1" | bc)
  fi
  hand_times+=("$hand")
  farm_times+=("$farm")
  last_farm_id="f$id"
  if ((round % 2)); then farm_span=("$t1" "$t2"); else farm_span=("$t0" "$t1"); fi
  printf '%-6s %10.2f %10.2f %7.2f\n' "$round" "$hand" "$farm" "$(echo "$farm / $hand" | bc -l)"
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
hand_median=$(median "${hand_times[@]}")
farm_median=$(median "${farm_times[@]}")
printf '%-6s %10.2f %10.2f %7.2f   (goal 6: farm/hand <= 1.10)\n' median "$hand_median" \
  "$farm_median" "$(echo "$farm_median / $hand_median" | bc -l)"
echo
echo "where the farm's time went, last round:"
build_id=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["polyarch.build.id"])' \
  "$farm_work/metadata-$last_farm_id.json")
"$POLYARCH" builds --json | "$PYTHON" bench/overhead_phases.py "$build_id" "${farm_span[@]}"

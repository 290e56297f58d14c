#!/usr/bin/env bash
# The main job on one machine: a local registry, a coordinator and two agents (docker/BuildKit
# and buildah, with QEMU for arm), then a 3-platform build of examples/hello, checked with
# `docker run --platform`. Stops everything it started (by PID) on exit.
set -euo pipefail
repo_root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo_root"

bash deploy/dev/bootstrap.sh
bash deploy/dev/dockerd.sh start

docker=${POLYARCH_DOCKER:-/usr/bin/docker}
polyarch=$repo_root/.venv/bin/polyarch
work=$(mktemp -d /tmp/polyarch-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Polls a command until it succeeds or the deadline (seconds) passes.
wait_for() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) > deadline )); then echo "timed out waiting for: $*" >&2; return 1; fi
    sleep 0.2
  done
}

reg_port=$(free_port)
cat > "$work/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$reg_port
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
registry=127.0.0.1:$reg_port
wait_for 30 curl -fsS "http://$registry/v2/"
echo "registry on $registry"

base=$(bash deploy/dev/base-image.sh "$registry" | tail -n 1)
echo "base image $base"

coord_port=$(free_port)
export POLYARCH_COORDINATOR=127.0.0.1:$coord_port
"$polyarch" coordinator --listen "$POLYARCH_COORDINATOR" --data-dir "$work/coordinator" \
  --metrics-listen "127.0.0.1:$(free_port)" >"$work/coordinator.log" 2>&1 &
pids+=($!)
"$polyarch" agent --name docker-1 --builder docker --docker-binary "$docker" --slots 3 \
  --work-dir "$work/agent-docker" >"$work/agent-docker.log" 2>&1 &
pids+=($!)
"$polyarch" agent --name buildah-1 --builder buildah --slots 3 \
  --work-dir "$work/agent-buildah" >"$work/agent-buildah.log" 2>&1 &
pids+=($!)
agents_ready() { [ "$("$polyarch" agents --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 2 ]; }
wait_for 60 agents_ready
"$polyarch" agents

image=$registry/demo/hello
start=$(date +%s.%N)
digest=$("$polyarch" build --platform linux/amd64,linux/arm64,linux/arm/v7 \
  -t "$image:latest" --build-arg "BASE=$base" --metadata-file "$work/metadata.json" examples/hello)
end=$(date +%s.%N)
echo
echo "index digest: $digest"
printf 'build wall time: %.1f s\n' "$(echo "$end - $start" | bc)"
for platform in linux/amd64 linux/arm64 linux/arm/v7; do
  printf '%-14s uname -m: %s\n' "$platform" \
    "$("$docker" run --rm --pull always --platform "$platform" "$image:latest" 2>/dev/null)"
done

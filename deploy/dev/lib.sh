#!/usr/bin/env bash
# Shared by demo.sh and bench/: a local registry and a farm (coordinator + docker and buildah
# agents) started in the background, every PID recorded so cleanup stops only those.
# Source it, then call farm_cleanup on EXIT.

polyarch_pids=()

farm_cleanup() {
  local pid
  for pid in "${polyarch_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${polyarch_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n ${farm_work:-} ]]; then rm -rf "$farm_work"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for SECONDS COMMAND...: polls until COMMAND succeeds or the deadline passes.
wait_for() {
  local deadline=$(($(date +%s) + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    if (($(date +%s) > deadline)); then
      echo "timed out waiting for: $*" >&2
      return 1
    fi
    sleep 0.2
  done
}

# start_registry: sets REGISTRY (127.0.0.1:PORT) to a fresh CNCF registry under $farm_work.
start_registry() {
  local port
  port=$(free_port)
  cat >"$farm_work/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $farm_work/registry
http:
  addr: 127.0.0.1:$port
YAML
  docker-registry serve "$farm_work/registry.yml" >"$farm_work/registry.log" 2>&1 &
  polyarch_pids+=($!)
  REGISTRY=127.0.0.1:$port
  wait_for 30 curl -fsS "http://$REGISTRY/v2/"
}

agents_connected() {
  local want=$1 have
  have=$("$POLYARCH" agents --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  [[ $have == "$want" ]]
}

# start_coordinator: a coordinator (TLS, tokens: the secure default); exports
# POLYARCH_COORDINATOR and POLYARCH_TOKEN_FILE (the first admin token) for the client commands
# and sets AGENT_TOKEN, an agent enrolment token.
start_coordinator() {
  local port
  port=$(free_port)
  export POLYARCH_COORDINATOR=127.0.0.1:$port
  export POLYARCH_TOKEN_FILE=$farm_work/coordinator/admin.token
  "$POLYARCH" coordinator --listen "$POLYARCH_COORDINATOR" --data-dir "$farm_work/coordinator" \
    --agent-listen "127.0.0.1:$(free_port)" \
    --metrics-listen "127.0.0.1:$(free_port)" >"$farm_work/coordinator.log" 2>&1 &
  polyarch_pids+=($!)
  wait_for 30 test -s "$POLYARCH_TOKEN_FILE"
  AGENT_TOKEN=$("$POLYARCH" token create --role agent --ttl 1h --description "dev farm agents")
}

# start_agent NAME BUILDER SLOTS [AGENT FLAGS...]: one agent enrolled with AGENT_TOKEN.
start_agent() {
  local name=$1 builder=$2 slots=$3
  shift 3
  POLYARCH_TOKEN=$AGENT_TOKEN "$POLYARCH" agent --name "$name" --builder "$builder" \
    --slots "$slots" --work-dir "$farm_work/agent-$name" "$@" \
    >"$farm_work/agent-$name.log" 2>&1 &
  polyarch_pids+=($!)
}

# start_farm DOCKER_BINARY: a coordinator and two agents (docker, buildah).
start_farm() {
  local docker=$1
  start_coordinator
  start_agent docker-1 docker 2 --docker-binary "$docker"
  start_agent buildah-1 buildah 2
  wait_for 60 agents_connected 2
}

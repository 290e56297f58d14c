#!/usr/bin/env bash
# Starts/stops a background dockerd for machines without systemd (CI, dev boxes).
#   start   start dockerd unless a daemon already answers on the socket; wait until ready
#   stop    stop the dockerd this script started (by its PID), never any other
#   status  say whether a daemon answers and whether it is ours
# Exit codes: 0 ok; 1 failure. `start` prints "started" or "already-running" on stdout.
set -euo pipefail

STATE_DIR="${POLYARCH_RUN_DIR:-/run/polyarch}"
PIDFILE="${STATE_DIR}/dockerd.pid"
LOGFILE="${STATE_DIR}/dockerd.log"
# The Debian 20.10 client: PATH may hold a newer client without buildx support.
DOCKER="${POLYARCH_DOCKER:-/usr/bin/docker}"
DOCKERD="${POLYARCH_DOCKERD:-/usr/sbin/dockerd}"
SOCKET="${POLYARCH_DOCKER_SOCKET:-/var/run/docker.sock}"
# Extra daemon flags, word-split on purpose (e.g. --storage-driver vfs where
# overlay2 is unusable). Beware: a second daemon with --bridge none deletes the
# host's docker0, breaking the first daemon's networking.
read -r -a DOCKERD_ARGS <<<"${POLYARCH_DOCKERD_ARGS:-}"
START_TIMEOUT="${POLYARCH_DOCKERD_START_TIMEOUT:-60}"
STOP_TIMEOUT="${POLYARCH_DOCKERD_STOP_TIMEOUT:-30}"

log() { printf 'dockerd.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

daemon_answers() {
    # Talk to the default socket only: an inherited DOCKER_HOST must not make us
    # believe a remote daemon is the local one.
    DOCKER_HOST="unix://${SOCKET}" timeout 10 "$DOCKER" info >/dev/null 2>&1
}

# Prints the PID from our pidfile if that process is still our dockerd.
our_pid() {
    [[ -f $PIDFILE ]] || return 1
    local pid
    pid=$(<"$PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # Guard against PID reuse: the process must still be a dockerd.
    [[ $(cat "/proc/${pid}/comm" 2>/dev/null || true) == dockerd ]] || return 1
    printf '%s\n' "$pid"
}

start() {
    if daemon_answers; then
        log "a Docker daemon already answers on ${SOCKET}; not starting another"
        echo already-running
        return 0
    fi
    local pid
    if pid=$(our_pid); then
        # Ours, alive, but not answering yet (e.g. a start still in progress).
        log "our dockerd (pid ${pid}) exists but does not answer yet; waiting"
    else
        [[ -x $DOCKERD ]] || die "${DOCKERD} not found (run deploy/dev/bootstrap.sh)"
        mkdir -p "$STATE_DIR"
        # setsid: own session so the job-control of the caller's shell (and a
        # Ctrl-C there) does not reach the daemon.
        setsid "$DOCKERD" "${DOCKERD_ARGS[@]}" >>"$LOGFILE" 2>&1 </dev/null &
        pid=$!
        printf '%s\n' "$pid" >"$PIDFILE"
        log "started dockerd pid ${pid}, log ${LOGFILE}"
    fi
    local deadline=$((SECONDS + START_TIMEOUT))
    until daemon_answers; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            tail -n 30 "$LOGFILE" >&2 || true
            die "dockerd (pid ${pid}) exited during start-up; see ${LOGFILE}"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$LOGFILE" >&2 || true
            die "dockerd (pid ${pid}) not ready after ${START_TIMEOUT}s; left running, see ${LOGFILE}"
        fi
        sleep 0.2
    done
    log "dockerd ready"
    echo started
}

stop() {
    local pid
    if ! pid=$(our_pid); then
        rm -f "$PIDFILE"
        log "no dockerd started by this script is running; nothing to stop"
        return 0
    fi
    log "stopping dockerd pid ${pid}"
    kill -TERM "$pid"
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "dockerd pid ${pid} still running after ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$PIDFILE"
    log "stopped"
}

status() {
    local pid answers=no
    if daemon_answers; then answers=yes; fi
    if pid=$(our_pid); then
        echo "daemon answers: ${answers}; started by dockerd.sh: pid ${pid}"
    else
        echo "daemon answers: ${answers}; started by dockerd.sh: no"
    fi
    [[ $answers == yes ]]
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac

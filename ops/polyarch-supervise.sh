#!/bin/sh
# polyarch-supervise NAME: runs `polyarch agent` NAME where systemd does not, restarting it
# when it exits (1 s, doubling to 30 s while it keeps failing within a minute). Installed by
# `polyarch deploy` as /opt/polyarch/polyarch-supervise; its pid is in
# /run/polyarch/agent-NAME.pid and SIGTERM stops the agent (gracefully) and then itself.
set -u
name=$1
pidfile=/run/polyarch/agent-$name.pid
log=/var/log/polyarch/agent-$name.log
child=
stopping=
stop() {
    stopping=1
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null
        wait "$child" 2>/dev/null
    fi
    rm -f "$pidfile"
    exit 0
}
trap stop TERM INT
mkdir -p /run/polyarch /var/log/polyarch
echo $$ >"$pidfile"
delay=1
while [ -z "$stopping" ]; do
    started=$(date +%s)
    (
        set -a
        # shellcheck source=/dev/null
        . "/etc/polyarch/agent-$name.env"
        set +a
        exec /opt/polyarch/current/bin/polyarch agent --config "/etc/polyarch/agent-$name.toml"
    ) >>"$log" 2>&1 &
    child=$!
    wait "$child"
    status=$?
    child=
    echo "polyarch-supervise: agent $name exited with status $status; restart in ${delay}s" >>"$log"
    sleep "$delay" &
    wait $!
    if [ $(($(date +%s) - started)) -ge 60 ]; then
        delay=1
    elif [ "$delay" -lt 30 ]; then
        delay=$((delay * 2))
    fi
done

#!/usr/bin/env bash
# The README's test command, self-sufficient on a fresh Debian 12 machine (as root):
# bootstraps (idempotent: packages, binfmt, .venv), starts dockerd unless a daemon already
# answers, runs pytest with any extra arguments passed through, then stops dockerd only if
# this script started it. Registries, Prometheus and agents are started per test session by
# the fixtures. Exit status: pytest's (5, "no tests collected", is reported as a failure).
#   bash deploy/dev/test.sh                    # the whole suite
#   bash deploy/dev/test.sh tests/unit -x      # arguments go to pytest
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"

bash deploy/dev/bootstrap.sh
dockerd_state=$(bash deploy/dev/dockerd.sh start)
if [[ $dockerd_state == started ]]; then
    # Stop only the daemon this run started; one that was already there stays.
    trap 'bash deploy/dev/dockerd.sh stop || true' EXIT
fi

rc=0
.venv/bin/python -m pytest -q "$@" || rc=$?
if ((rc == 5)); then
    echo "test.sh: pytest collected no tests (exit 5); that is a failure" >&2
fi
exit "$rc"

#!/usr/bin/env bash
# Every static check in one command: ruff lint + format, mypy (strict, our
# packages), generated protobuf code freshness, shellcheck on our scripts.
# Runs them all and reports every failure, not just the first. Exit 0 = clean.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BIN=.venv/bin
[[ -x ${BIN}/python ]] || { echo "check.sh: no .venv; run deploy/dev/bootstrap.sh" >&2; exit 1; }

failed=()
step() {
    local name=$1
    shift
    printf '==> %s: %s\n' "$name" "$*"
    local started=$SECONDS
    if "$@"; then
        printf '    %s ok (%ss)\n' "$name" "$((SECONDS - started))"
    else
        printf '    %s FAILED (exit %s)\n' "$name" "$?"
        failed+=("$name")
    fi
}

step ruff-lint "${BIN}/ruff" check .
step ruff-format "${BIN}/ruff" format --check .
# mypy checks the installed import names (polyarch.*), found through the strict
# editable link tree under build/; generated *_pb2 modules have errors ignored.
step mypy "${BIN}/mypy" -p polyarch.coordinator -p polyarch.agent -p polyarch.client -p polyarch.ops -p polyarch.proto
step protos "${BIN}/python" proto/generate.py --check

mapfile -t scripts < <({ echo .ci/run; find deploy bench -name "*.sh" -type f; } | LC_ALL=C sort)
if command -v shellcheck >/dev/null; then
    step shellcheck shellcheck -x "${scripts[@]}"
else
    # bootstrap.sh installs it; don't make a half-set-up dev box fail on it.
    echo "==> shellcheck: not installed, skipped (deploy/dev/bootstrap.sh installs it)"
fi

if ((${#failed[@]} > 0)); then
    echo "check.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "check.sh: all checks passed"

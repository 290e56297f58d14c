#!/usr/bin/env bash
# The CI glue of deploy/ci: docker/build-push-action's inputs (INPUT_* variables) turned into
# one `polyarch build`, and its outputs written back: digest, imageid and metadata to
# $GITHUB_OUTPUT (GitHub Actions) and POLYARCH_DIGEST to $POLYARCH_DOTENV (a GitLab dotenv
# report). List inputs take one item per line or comma-separated, as build-push-action's.
# The coordinator and credentials come from POLYARCH_COORDINATOR, POLYARCH_TOKEN (or
# POLYARCH_TOKEN_FILE) and POLYARCH_CA_FILE, as for every polyarch command.
set -euo pipefail

polyarch=${POLYARCH_CLI:-polyarch}
work=$(mktemp -d "${RUNNER_TEMP:-${TMPDIR:-/tmp}}/polyarch-ci.XXXXXX")
trap 'rm -rf "$work"' EXIT

# items NAME SEPARATORS: the input's items, one per line, blanks dropped
items() {
  local value=${!1:-}
  if [[ $2 == "lines-and-commas" ]]; then value=${value//,/$'\n'}; fi
  printf '%s\n' "$value" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' | sed '/^$/d'
}
truthy() { [[ ${!1:-false} =~ ^(true|True|TRUE|1|yes)$ ]]; }

args=(build --metadata-file "$work/metadata.json" --iidfile "$work/iid")
[[ -n ${INPUT_PLATFORMS:-} ]] || { echo "polyarch: the platforms input is required" >&2; exit 2; }
args+=(--platform "$(items INPUT_PLATFORMS lines-and-commas | paste -sd, -)")
while read -r tag; do args+=(-t "$tag"); done < <(items INPUT_TAGS lines-and-commas)
[[ -n ${INPUT_FILE:-} ]] && args+=(-f "$INPUT_FILE")
while read -r pair; do args+=(--build-arg "$pair"); done < <(items INPUT_BUILD_ARGS lines)
while read -r pair; do args+=(--label "$pair"); done < <(items INPUT_LABELS lines)
while read -r spec; do args+=(--annotation "$spec"); done < <(items INPUT_ANNOTATIONS lines)
while read -r spec; do args+=(--cache-from "$spec"); done < <(items INPUT_CACHE_FROM lines)
while read -r spec; do args+=(--cache-to "$spec"); done < <(items INPUT_CACHE_TO lines)
truthy INPUT_NO_CACHE && args+=(--no-cache)
truthy INPUT_PULL && args+=(--pull)
# secrets: | NAME=value (as build-push-action): each value goes to a 0600 file, never argv
n=0
while IFS= read -r secret; do
  name=${secret%%=*}
  [[ $secret == *=* && -n $name ]] || { echo "polyarch: secret '${name}' is not NAME=value" >&2; exit 2; }
  n=$((n + 1))
  (umask 077 && printf '%s' "${secret#*=}" >"$work/secret-$n")
  args+=(--secret "id=$name,src=$work/secret-$n")
done < <(items INPUT_SECRETS lines)
if truthy INPUT_PUSH || [[ -z ${INPUT_PUSH:-} ]]; then
  args+=(--push)
else
  args+=(--output "type=image,push=false") # build and verify every platform, publish nothing
fi
args+=("${INPUT_CONTEXT:-.}")

"$polyarch" "${args[@]}"

digest=$(cat "$work/iid")
if [[ -n ${GITHUB_OUTPUT:-} ]]; then
  {
    echo "digest=$digest"
    echo "imageid=$digest"
    delimiter="polyarch-metadata-$RANDOM$RANDOM"
    echo "metadata<<$delimiter"
    cat "$work/metadata.json"
    echo "$delimiter"
  } >>"$GITHUB_OUTPUT"
fi
if [[ -n ${POLYARCH_DOTENV:-} ]]; then
  echo "POLYARCH_DIGEST=$digest" >>"$POLYARCH_DOTENV"
fi

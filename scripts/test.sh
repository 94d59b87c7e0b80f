#!/usr/bin/env bash
# Run the test suite on each environment of scripts/env.sh (default: mcore016 and mcore019;
# HELIX_ENVS="mcore019" runs one). Extra arguments go to pytest. Environments missing on first
# use are all set up at once, in the background (mostly downloads): the first suite starts as
# soon as its own environment is ready, while the next one's installs.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a envs <<<"${HELIX_ENVS:-mcore016 mcore019}"
mkdir -p out
declare -A setup
for env in "${envs[@]}"; do
    (source scripts/env.sh "$env") >"out/env-$env.log" 2>&1 &
    setup[$env]=$!
done
status=0
for env in "${envs[@]}"; do
    if ! wait "${setup[$env]}"; then
        cat "out/env-$env.log" >&2
        echo "scripts/test.sh: the $env environment failed to set up" >&2
        exit 1
    fi
    (
        source scripts/env.sh "$env"
        python -c 'import sys, megatron.core, torch
print("==", sys.argv[1], "| Python", sys.version.split()[0], "| megatron-core",
      megatron.core.__version__, "| torch", torch.__version__, flush=True)' "$env"
        python -m pytest -q --durations=25 "$@"
    ) || status=1
done
exit "$status"

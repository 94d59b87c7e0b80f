#!/usr/bin/env bash
# Run the test suite on each environment of scripts/env.sh (default: mcore019 and mcore016;
# HELIX_ENVS="mcore019" runs one). Extra arguments go to pytest.
#
# Environments missing on first use are set up one after the other (mostly downloads; two at
# once would need the disk for both downloads at the same time), the larger first, and each
# suite starts as soon as its environment is ready, beside the other: the suites also wait on
# process start-up, rendezvous and I/O, so on two cores the two together take less than one
# after the other (a fresh clone here: 18.4 against 20.3 minutes in all). Each suite writes
# out/test-ENV.log (and uses its own pytest temporary directory), printed here when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a envs <<<"${HELIX_ENVS:-mcore019 mcore016}"
mkdir -p out

disk_free() {  # what the checkout's and the temporary directory's file systems have left
    df -Ph . "${TMPDIR:-/tmp}" | awk 'NR > 1 {printf "%s%s free on %s", sep, $4, $6; sep = ", "}'
}

suite() {
    local env="$1"
    shift
    source scripts/env.sh "$env"
    python -c 'import sys, megatron.core, torch
print("==", sys.argv[1], "| Python", sys.version.split()[0], "| megatron-core",
      megatron.core.__version__, "| torch", torch.__version__, flush=True)' "$env"
    local basetemp="${TMPDIR:-/tmp}/megatron_helix-pytest-$env-$$"
    python -m pytest -q -p no:cacheprovider --basetemp "$basetemp" --durations=25 "$@"
    local status=$?
    rm -rf "$basetemp"
    return "$status"
}

echo "scripts/test.sh: testing ${envs[*]} (logs: out/test-*.log; disk: $(disk_free))"
status=0
declare -A running
for env in "${envs[@]}"; do
    if ! (source scripts/env.sh "$env") >"out/env-$env.log" 2>&1; then
        cat "out/env-$env.log"
        echo "scripts/test.sh: the $env environment failed to set up (disk: $(disk_free))"
        status=1
        continue
    fi
    (set +e; suite "$env" "$@") >"out/test-$env.log" 2>&1 &
    running[$env]=$!
done
for env in "${envs[@]}"; do
    [ -n "${running[$env]:-}" ] || continue
    wait "${running[$env]}" || status=1
    cat "out/test-$env.log"
done
exit "$status"

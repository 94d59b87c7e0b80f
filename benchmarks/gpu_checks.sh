#!/usr/bin/env bash
# Every check this repository needs a GPU for, sized to one 15-minute window on one H100/H200
# (one command of at most 10 minutes), from the repository root:
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]              # default: $OUT, else ./gpu_checks
#   bash benchmarks/gpu_checks.sh --cpu-smoke OUT_DIR    # rehearsal: same steps, tiny sizes, CPU
#
# Most decisive first; each step runs under its own cap (`timeout`). The estimates are for one
# H200 and have not been measured: python start-up and CUDA initialisation ~10 s a step, and
# the ring benchmark's rounds scaled from ~9.3 s a round (monolithic + ring, both masks) at
# s = 100k, by s^2, a third of that for the causal mask alone.
#
#   step            what                                                    estimate   cap
#   machine         GPU, SMs, L2, max persisting L2, clocks, driver, versions    10 s   30 s
#   ring_s32k_R8    ring efficiency, bf16, s = 32k, R = 8, both masks, 20 it     35 s   75 s
#   cuda_tests      pytest tests/test_ring_attention.py ... -k cuda              20 s   45 s
#   bench           measured calibration: megatron-helix bench --device cuda     30 s  120 s
#   l2_residency    one decode layer in a CUDA graph, with/without L2 window     15 s   60 s
#   ring_s32k_R16   ring efficiency, causal, s = 32k, R = 16, 10 it              20 s   45 s
#   ring_s100k_R8   ring efficiency, causal, s = 100k, R = 8, 5 it               35 s   75 s
#   ring_s100k_R16  ring efficiency, causal, s = 100k, R = 16, 5 it              40 s   80 s
#   total                                                                       205 s  530 s
#
# bench's estimate and cap are megatron_helix/perf/device_calibration.py's (~25 s, 2 minutes
# allowed). The caps add up to under 9 minutes (each with 5 s to exit after its TERM), so the
# script ends inside one 10-minute command even if every step hits its cap. A failing or
# capped step is recorded and the rest still run. OUT_DIR gets two files: summary.json (mode,
# commit, machine, then per step: name, command, cap, estimate, seconds, exit status, status
# and its JSON result inline; rewritten after every step) and gpu_checks.log (every step's
# output). Exit status 1 when any step was not ok.
# Needs torch with CUDA and pytest; tests/test_gpu_checks.py runs the rehearsal.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
if [ "${1:-}" = --cpu-smoke ]; then
    mode=cpu-smoke
    shift
fi
out="${1:-${OUT:-gpu_checks}}"
mkdir -p "$out"
summary="$out/summary.json" log="$out/gpu_checks.log"
raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"

if [ "$mode" = gpu ]; then
    device=cuda quick=() ring=(--dtype bf16 --heads 32 --head-dim 128) s32k=32768 s100k=100000
    l2=()
else  # tiny sizes (ring lengths divisible by 2R for R = 16), one thread per process: on a
    export OMP_NUM_THREADS=1  # shared machine two-thread ops stall for seconds
    device=cpu quick=(--quick) ring=(--dtype fp32 --heads 2 --head-dim 16) s32k=256 s100k=320
    l2=(--context 64 --steps 20 --warmup 2)
fi

record() {  # record NAME CAP ESTIMATE EXIT_STATUS START END RESULT COMMAND...: into the summary
    "$python" - "$summary" "$mode" "$@" <<'EOF'
import json, os, shlex, subprocess, sys
from xml.etree import ElementTree

path, mode, name, cap, estimate, rc, start, end, result, *command = sys.argv[1:]
if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
else:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    summary = {"mode": mode, "commit": commit.stdout.strip() or None, "machine": None,
               "steps": []}
parsed = None
try:
    if result.endswith(".xml"):  # pytest's junit report: the counts
        suite = ElementTree.parse(result).getroot().find("testsuite")
        parsed = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    else:
        with open(result, encoding="utf-8") as f:
            parsed = json.load(f)
except (OSError, ValueError, AttributeError, ElementTree.ParseError):
    pass  # no result, or a broken one: the exit status says why
rc = int(rc)
summary["steps"].append({
    "name": name, "command": shlex.join(command), "cap_s": int(cap),
    "estimate_s": int(estimate), "seconds": round(float(end) - float(start), 2),
    "exit_status": rc,
    "status": "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed",
    "result": parsed})
if name == "machine":
    summary["machine"] = parsed
summary["seconds_total"] = round(sum(step["seconds"] for step in summary["steps"]), 2)
with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
os.replace(path + ".tmp", path)
step = summary["steps"][-1]
print(f"== {name}: {step['status']} in {step['seconds']} s (cap {cap} s, estimate {estimate} s)")
EOF
}

failed=0
step() {  # step NAME CAP_S ESTIMATE_S RESULT_PATH COMMAND...: run under the cap, log, record
    local name=$1 cap=$2 estimate=$3 result=$4 start rc
    shift 4
    echo "== $name (cap $cap s, estimate $estimate s): $*" | tee -a "$log"
    start=$EPOCHREALTIME
    timeout -k 5 "$cap" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    record "$name" "$cap" "$estimate" "$rc" "$start" "$EPOCHREALTIME" "$result" "$@" \
        2>&1 | tee -a "$log"
    [ "$rc" -eq 0 ] || failed=1
}

ring_step() {  # ring_step NAME CAP_S ESTIMATE_S SEQ RING MASK ITERS WARMUP (rehearsal: 2 and 1)
    local iters=("$7" "$8")
    [ "$mode" = gpu ] || iters=(2 1)
    step "$1" "$2" "$3" "$raw/$1.json" "$python" -m benchmarks.ring_efficiency \
        --device "$device" "${ring[@]}" --seq-len "$4" --ring-size "$5" --batch 1 --mask "$6" \
        --iters "${iters[0]}" --warmup "${iters[1]}" --json "$raw/$1.json"
}

rm -f "$summary" "$log"
step machine 30 10 "$raw/machine.json" \
    "$python" -m benchmarks.l2_residency --machine --out "$raw/machine.json"
ring_step ring_s32k_R8 75 35 "$s32k" 8 both 20 3
step cuda_tests 45 20 "$raw/cuda_tests.xml" "$python" -m pytest -q -p no:cacheprovider \
    tests/test_ring_attention.py tests/test_block_kernel_choice.py -k cuda \
    --junitxml "$raw/cuda_tests.xml"
step bench 120 30 "$raw/bench.json" \
    "$python" -m megatron_helix.cli bench --device "$device" "${quick[@]}" --json "$raw/bench.json"
step l2_residency 60 15 "$raw/l2_residency.json" "$python" -m benchmarks.l2_residency \
    --device "$device" "${l2[@]}" --out "$raw/l2_residency.json"
ring_step ring_s32k_R16 45 20 "$s32k" 16 causal 10 2
ring_step ring_s100k_R8 75 35 "$s100k" 8 causal 5 1
ring_step ring_s100k_R16 80 40 "$s100k" 16 causal 5 1

if [ "$failed" -ne 0 ]; then
    echo "some steps failed or hit their cap: see $summary" | tee -a "$log"
    exit 1
fi
echo "all $mode checks ran; results in $summary" | tee -a "$log"

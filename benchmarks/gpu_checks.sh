#!/usr/bin/env bash
# Every check this repository needs a GPU for, in one run on one H100/H200, from the repository
# root (about 5 minutes of GPU time, most of it the s = 100k ring benchmarks):
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]        # default: $OUT, else ./gpu_checks
#
# 1. the CUDA block kernels against fp32 attention (bf16, GQA, causal and not);
# 2. the ring efficiency benchmark, bf16, s = 32k and 100k, R = 8 and 16 (docs/RING_ATTENTION.md);
# 3. L2 residency of one decode layer (docs/LAYERWISE.md).
# Needs torch with CUDA and pytest; megatron-core is not imported. Each step's output goes to
# OUT_DIR (logs and JSON); a failing step is reported and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_checks}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"
failed=()

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    | tee "$out/machine.csv"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$out/machine.csv"

step cuda_tests "$python" -m pytest -q -p no:cacheprovider tests/test_ring_attention.py \
    tests/test_block_kernel_choice.py -k cuda
for seq in 32768 100000; do
    for ring in 8 16; do
        step "ring_bf16_s${seq}_R${ring}" "$python" -m benchmarks.ring_efficiency --device cuda \
            --dtype bf16 --seq-len "$seq" --ring-size "$ring" --heads 32 --head-dim 128 \
            --batch 1 --iters 20 --warmup 3 --json "$out/ring_bf16_s${seq}_R${ring}.json"
    done
done
step l2_residency "$python" -m benchmarks.l2_residency --out "$out/l2_residency.json"

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all GPU checks ran; results in $out"

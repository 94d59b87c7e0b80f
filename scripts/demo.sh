#!/usr/bin/env bash
# The CPU demo: a small GPT trained on one device and with helix (m=2, n=2) on 4 gloo ranks,
# same seed, same data; prints both loss curves and their largest difference.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh newest
out="${HELIX_DEMO_DIR:-out/demo}"
mkdir -p "$out"
model=(--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 64
       --micro-batch-size 4 --train-iters "${HELIX_DEMO_ITERS:-30}" --lr 3e-3 --seed 1234)
run() { torchrun --standalone --nproc-per-node "$1" examples/pretrain_helix_gpt.py "${@:2}"; }
echo "== single device"
run 1 "${model[@]}" --metrics-file "$out/single.jsonl"
echo "== helix m=2 x n=2 on 4 ranks"
run 4 "${model[@]}" --helix-m 2 --helix-n 2 --metrics-file "$out/helix.jsonl"
echo "== comparison"
python examples/compare_runs.py "$out/single.jsonl" "$out/helix.jsonl"

#!/usr/bin/env bash
# Seed 003: 16-layer dense GPT, hidden 4096 = 32 heads x 128, MLP 16384, sequence 10000,
# global batch 128, FP16, 16 GPUs. Proposed layout: layer-wise, one decoder layer per GPU
# (--helix-layerwise = 16 pipeline stages), cut by the layer-wise planner under
# CACHE_BUDGET:
#   h100-hbm (default)  every stage's training working set must fit one H100's HBM: runs the
#                       seed's one-layer-per-GPU layout.
#   50MB                the seed's L2 claim. One layer holds ~403 MB of FP16 weights, so the
#                       planner refuses at argument validation and prints what would fit.
# The seed's baseline uses micro batch 16 (MICRO_BATCH=16 applies it to every layout).
#
# usage: e_seed003_layerwise16.sh {proposed|tp8pp2|tp16}     (environment: see common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${PRECISION:=fp16}" "${CACHE_BUDGET:=h100-hbm}"
GLOBAL_BATCH=128
MODEL_ARGS=(--num-layers 16 --hidden-size 4096 --num-attention-heads 32 --kv-channels 128
    --ffn-hidden-size 16384 --seq-length 10000 --max-position-embeddings 10000)
PROPOSED_ARGS=(--helix-layerwise --helix-cache-budget "$CACHE_BUDGET")
# CPU_TWIN=1 (common.sh): same flags, tiny shapes, 4 ranks.
TWIN_MODEL_ARGS=(--num-layers 4 --hidden-size 64 --num-attention-heads 8 --kv-channels 8
    --ffn-hidden-size 256 --seq-length 64 --max-position-embeddings 64)
TWIN_PROPOSED_ARGS=(--helix-layerwise --helix-cache-budget "$CACHE_BUDGET")
run_recipe "${1:-}"

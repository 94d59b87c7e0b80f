#!/usr/bin/env bash
# Seed 001: 2-layer dense GPT, 16 heads x 512 (hidden 8192), MLP 32768, sequence 10000,
# global batch 1024, FP16, 16 GPUs. Proposed layout: helix m=4 x n=4 (4 heads per group,
# 128 of each head's 512 dims per rank). NUM_LAYERS=4 gives seed 002's dense row, which
# states the same shape with 4 layers (and no sequence length).
#
# usage: b_seed001_dense2_h8192.sh {proposed|tp8pp2|tp16}     (environment: see common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${PRECISION:=fp16}" "${NUM_LAYERS:=2}"
GLOBAL_BATCH=1024
MODEL_ARGS=(--num-layers "$NUM_LAYERS" --hidden-size 8192 --num-attention-heads 16
    --kv-channels 512 --ffn-hidden-size 32768 --seq-length 10000 --max-position-embeddings 10000)
PROPOSED_ARGS=(--helix-m 4 --helix-n 4)
# CPU_TWIN=1 (common.sh): same flags, tiny shapes, 4 ranks.
TWIN_MODEL_ARGS=(--num-layers "$NUM_LAYERS" --hidden-size 64 --num-attention-heads 4
    --kv-channels 32 --ffn-hidden-size 256 --seq-length 64 --max-position-embeddings 64)
TWIN_PROPOSED_ARGS=(--helix-m 2 --helix-n 2)
run_recipe "${1:-}"

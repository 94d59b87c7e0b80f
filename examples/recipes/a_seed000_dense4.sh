#!/usr/bin/env bash
# Seed 000: 4-layer dense GPT, hidden 4096 = 32 heads x 128, MLP 16384, sequence 10000,
# global batch 128, FP16, 16 GPUs. Proposed layout: helix m=4 (dim slices) x n=4 (head
# groups) = tensor-parallel group of 16.
#
# usage: a_seed000_dense4.sh {proposed|tp8pp2|tp16}     (environment: see common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${PRECISION:=fp16}"
GLOBAL_BATCH=128
MODEL_ARGS=(--num-layers 4 --hidden-size 4096 --num-attention-heads 32 --kv-channels 128
    --ffn-hidden-size 16384 --seq-length 10000 --max-position-embeddings 10000)
PROPOSED_ARGS=(--helix-m 4 --helix-n 4)
# CPU_TWIN=1 (common.sh): same flags, tiny shapes, 4 ranks.
TWIN_MODEL_ARGS=(--num-layers 4 --hidden-size 64 --num-attention-heads 8 --kv-channels 8
    --ffn-hidden-size 256 --seq-length 64 --max-position-embeddings 64)
TWIN_PROPOSED_ARGS=(--helix-m 2 --helix-n 2)
run_recipe "${1:-}"

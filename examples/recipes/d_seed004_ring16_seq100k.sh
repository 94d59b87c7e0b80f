#!/usr/bin/env bash
# Seed 004: 16-layer dense GPT, hidden 4096 = 32 heads x 128, MLP 16384, sequence 100,000,
# global batch 128, BF16, 16 GPUs. Proposed layout: ring attention over 16 ranks
# (--helix-ring-size 16 = context-parallel size 16, 6250 tokens per rank). The seed's
# baseline (TP=8 x PP=2, no sequence split) holds whole 100,000-token sequences per
# pipeline stage; it may not fit in memory, which is part of what the comparison shows.
# Changes Megatron-LM's default --attention-dropout 0.1 to 0, for every layout: long contexts
# train without attention dropout, and with it the ring would run its math block kernel, which
# materializes each block's scores (fp32 [b, heads, 6250, 12500] per step here).
#
# usage: d_seed004_ring16_seq100k.sh {proposed|tp8pp2|tp16}     (environment: see common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${PRECISION:=bf16}"
GLOBAL_BATCH=128
MODEL_ARGS=(--num-layers 16 --hidden-size 4096 --num-attention-heads 32 --kv-channels 128
    --ffn-hidden-size 16384 --seq-length 100000 --max-position-embeddings 100000
    --attention-dropout 0)
PROPOSED_ARGS=(--helix-ring-size 16)
# CPU_TWIN=1 (common.sh): same flags, tiny shapes, 4 ranks.
TWIN_MODEL_ARGS=(--num-layers 4 --hidden-size 64 --num-attention-heads 8 --kv-channels 8
    --ffn-hidden-size 256 --seq-length 128 --max-position-embeddings 128 --attention-dropout 0)
TWIN_PROPOSED_ARGS=(--helix-ring-size 4)
run_recipe "${1:-}"

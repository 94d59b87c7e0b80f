#!/usr/bin/env bash
# Seed 002: 4-layer MoE GPT, 8 experts per layer, 16 heads x 512 (hidden 8192), MLP 32768,
# global batch 1024, FP16, 16 GPUs. The seed gives no sequence length: 10000 is taken from
# seeds 000/001 (SEQ_LENGTH overrides it). Proposed layout: helix m=4 x n=4 for attention.
# The experts are laid out the same way in every layout: expert parallel size 8 (one whole
# expert per rank, expert tensor parallel size 1), top-2 routing, all-to-all dispatcher.
#
# usage: c_seed002_moe4.sh {proposed|tp8pp2|tp16}     (environment: see common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${PRECISION:=fp16}" "${SEQ_LENGTH:=10000}"
GLOBAL_BATCH=1024
MODEL_ARGS=(--num-layers 4 --hidden-size 8192 --num-attention-heads 16 --kv-channels 512
    --ffn-hidden-size 32768 --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --num-experts 8 --moe-router-topk 2 --moe-token-dispatcher-type alltoall
    --moe-aux-loss-coeff 1e-2 --expert-model-parallel-size 8 --expert-tensor-parallel-size 1)
PROPOSED_ARGS=(--helix-m 4 --helix-n 4)
# CPU_TWIN=1 (common.sh): same flags, tiny shapes, 4 ranks.
TWIN_MODEL_ARGS=(--num-layers 4 --hidden-size 64 --num-attention-heads 4 --kv-channels 32
    --ffn-hidden-size 256 --seq-length 64 --max-position-embeddings 64
    --num-experts 4 --moe-router-topk 2 --moe-token-dispatcher-type alltoall
    --moe-aux-loss-coeff 1e-2 --expert-model-parallel-size 4 --expert-tensor-parallel-size 1)
TWIN_PROPOSED_ARGS=(--helix-m 2 --helix-n 2)
run_recipe "${1:-}"

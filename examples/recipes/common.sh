# Shared part of the seed-workload recipes: 16 GPUs (2 nodes x 8), Megatron-LM's
# pretrain_gpt.py on mock data. Sourced by the recipe scripts, never run on its own.
#
# Every layout of one workload (the proposed one and its TP=8 x PP=2 and TP=16 twins) gets
# the same flags from here: global and micro batch, sequence length, precision, full
# recomputation, sequence parallelism, optimizer and data, so throughput differences come
# from the layout alone. A recipe script defines MODEL_ARGS, GLOBAL_BATCH and PROPOSED_ARGS
# and calls `run_recipe LAYOUT`.
#
# Environment:
#   MEGATRON_LM_DIR   Megatron-LM checkout at core_v0.16.1 or core_v0.19.0 (required; the tag of
#                     the installed megatron-core line, 0.16.x or 0.19.x)
#   LAUNCH            patched  (default: pretrain_gpt.py of a tree patched by patches/apply.sh)
#                     launcher (unmodified tree, run through python -m megatron_helix.launch)
#   NODE_RANK, MASTER_ADDR  required for a real run; MASTER_PORT (default 6000)
#   NNODES (2), GPUS_PER_NODE (8)
#   PRECISION         fp16 | bf16 (each recipe sets the seed's precision as its default)
#   MICRO_BATCH (1), TRAIN_ITERS (20), LOG_INTERVAL (1)
#   TRANSFORMER_IMPL  transformer_engine (default) | local, the same for every layout
#   EXTRA_ARGS        appended verbatim to every layout (e.g. "--helix-score-strategy allreduce")
#   DRY_RUN=1         print the command instead of running it
#   CPU_TWIN=1        run the recipe's CPU-sized twin instead (no GPU needed, proposed layout
#                     only): the same flags with the recipe's TWIN_MODEL_ARGS (tiny shapes) and
#                     TWIN_PROPOSED_ARGS, on 4 gloo ranks of this machine, fp32 (the CPU mode
#                     has no fp16/bf16), local layers, 3 iterations, through
#                     `python -m megatron_helix.launch --cpu` (tests run it in CI)

: "${NNODES:=2}" "${GPUS_PER_NODE:=8}" "${MASTER_PORT:=6000}"
: "${LAUNCH:=patched}" "${MICRO_BATCH:=1}" "${TRAIN_ITERS:=20}" "${LOG_INTERVAL:=1}"
: "${TRANSFORMER_IMPL:=transformer_engine}" "${DRY_RUN:=0}"

# Megatron's TP+SP communication overlap wants one hardware queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS=1

_die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

_precision_args() {
    case "$PRECISION" in
        fp16) PRECISION_ARGS=(--fp16 --initial-loss-scale 65536) ;;
        bf16) PRECISION_ARGS=(--bf16) ;;
        *) _die "PRECISION must be fp16 or bf16, got '$PRECISION'" ;;
    esac
}

_layout_args() {
    case "$1" in
        proposed) LAYOUT_ARGS=("${PROPOSED_ARGS[@]}") ;;
        tp8pp2) LAYOUT_ARGS=(--tensor-model-parallel-size 8 --pipeline-model-parallel-size 2) ;;
        tp16) LAYOUT_ARGS=(--tensor-model-parallel-size 16) ;;
        *) _die "usage: $(basename "$0") {proposed|tp8pp2|tp16} (got '$1')" ;;
    esac
}

_launcher() {
    local script="$MEGATRON_LM_DIR/pretrain_gpt.py"
    [[ -f "$script" ]] || _die "no pretrain_gpt.py in MEGATRON_LM_DIR=$MEGATRON_LM_DIR"
    LAUNCHER=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
        --node-rank "${NODE_RANK:-NODE_RANK}" --master-addr "${MASTER_ADDR:-MASTER_ADDR}"
        --master-port "$MASTER_PORT")
    case "$LAUNCH" in
        patched) LAUNCHER+=("$script") ;;
        launcher) LAUNCHER+=(-m megatron_helix.launch "$script") ;;
        *) _die "LAUNCH must be patched or launcher, got '$LAUNCH'" ;;
    esac
}

_cpu_twin() {
    [[ "$1" == proposed ]] || _die "CPU_TWIN runs the proposed layout only (got '$1')"
    MODEL_ARGS=("${TWIN_MODEL_ARGS[@]}")
    LAYOUT_ARGS=("${TWIN_PROPOSED_ARGS[@]}")
    GLOBAL_BATCH=4 TRAIN_ITERS=3 TRANSFORMER_IMPL=local PRECISION_ARGS=()
    local script="$MEGATRON_LM_DIR/pretrain_gpt.py"
    [[ -f "$script" ]] || _die "no pretrain_gpt.py in MEGATRON_LM_DIR=$MEGATRON_LM_DIR"
    LAUNCHER=(torchrun --standalone --nproc-per-node 4 -m megatron_helix.launch --cpu "$script")
}

run_recipe() {
    : "${MEGATRON_LM_DIR:?set MEGATRON_LM_DIR to a Megatron-LM core_v0.16.1 or core_v0.19.0 checkout}"
    if [[ "${CPU_TWIN:-0}" == 1 ]]; then
        _cpu_twin "${1:-}"
    else
        _layout_args "${1:-}"
        _precision_args
        _launcher
    fi
    local common=(
        --mock-data --tokenizer-type NullTokenizer --vocab-size 50257
        --position-embedding-type rope
        --transformer-impl "$TRANSFORMER_IMPL"
        --global-batch-size "$GLOBAL_BATCH" --micro-batch-size "$MICRO_BATCH"
        --sequence-parallel
        --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
        --train-iters "$TRAIN_ITERS" --eval-iters 0 --eval-interval 1000
        --lr 1.0e-4 --min-lr 1.0e-5 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
        --log-interval "$LOG_INTERVAL" --log-throughput --distributed-timeout-minutes 30
    )
    # shellcheck disable=SC2206  # EXTRA_ARGS is meant to word-split
    local cmd=("${LAUNCHER[@]}" "${MODEL_ARGS[@]}" "${common[@]}" "${PRECISION_ARGS[@]}"
        "${LAYOUT_ARGS[@]}" ${EXTRA_ARGS:-})
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%q ' "${cmd[@]}"
        echo
        return
    fi
    [[ "${CPU_TWIN:-0}" == 1 ]] && exec "${cmd[@]}"
    : "${NODE_RANK:?set NODE_RANK (0 or 1)}"
    : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
    exec "${cmd[@]}"
}

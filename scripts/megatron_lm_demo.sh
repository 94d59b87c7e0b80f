#!/usr/bin/env bash
# Megatron-LM's own pretrain_gpt.py on CPU gloo ranks: the tiny GPT of examples/tiny_gpt.args,
# 5 iterations on one rank and on helix m=2 x n=2 (4 ranks), same seed, Megatron's own
# (CPU) initialization. Prints both loss curves; exits non-zero if they differ by more than
# 1e-5 relative.
#
# usage: scripts/megatron_lm_demo.sh MEGATRON_LM_DIR
#   (a core_v0.16.1 or core_v0.19.0 tree, patched or not; the environment of the tree's
#   megatron-core line is activated: mcore016 or mcore019, scripts/env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 1 && -f "$1/pretrain_gpt.py" ]] || {
    echo "usage: $0 MEGATRON_LM_DIR (a Megatron-LM core_v0.16.1 or core_v0.19.0 tree)" >&2; exit 2; }
minor="$(awk '/^MINOR = /{print $3}' "$1/megatron/core/package_info.py" 2>/dev/null || true)"
case "$minor" in
    16) source scripts/env.sh mcore016 ;;
    19) source scripts/env.sh mcore019 ;;
    *) echo "$0: $1 is megatron-core 0.${minor:-?}: the demo runs core_v0.16.1 or core_v0.19.0" >&2
       exit 2 ;;
esac
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=1
read -r -a tiny <<<"$(tr '\n' ' ' <examples/tiny_gpt.args)"
curve() {  # NPROC FLAGS... -> one loss per line
    local nproc=$1; shift
    (cd "$TREE" && torchrun --standalone --nproc-per-node "$nproc" -m megatron_helix.launch --cpu \
        pretrain_gpt.py "${tiny[@]}" --train-iters 5 "$@" 2>&1) |
        sed -n 's/.*| lm loss: \([0-9.E+-]*\) |.*/\1/p'
}
TREE="$(cd "$1" && pwd)"
one="$(curve 1)"
helix="$(curve 4 --helix-m 2 --helix-n 2)"
paste <(echo "one rank"; echo "$one") <(echo "helix 2x2"; echo "$helix")
python - "$one" "$helix" <<'PY'
import sys
one, helix = ([float(x) for x in arg.split()] for arg in sys.argv[1:])
assert len(one) == len(helix) == 5, (one, helix)
worst = max(abs(a - b) / abs(a) for a, b in zip(one, helix))
print(f"largest relative difference: {worst:.2e}")
sys.exit(0 if worst <= 1e-5 else 1)
PY

# Source me: creates (once) and activates the project's virtual environment in .venv.
#
# torch is installed first and pinned, so that installing megatron-core does not resolve
# another torch. Which build arrives depends on the package index: where a local wheel folder
# provides torch's CPU build pip takes it, while PyPI's Linux torch is the CUDA build (a few GB;
# it runs on CPU too). HELIX_TORCH_SPEC picks another torch (e.g. on a GPU box).
_helix_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_helix_venv="${HELIX_VENV:-$_helix_root/.venv}"
_helix_stamp="$_helix_venv/.megatron_helix-installed"
if [ ! -f "$_helix_stamp" ] || [ "$_helix_root/setup.py" -nt "$_helix_stamp" ]; then
    echo "setting up $_helix_venv (first use) ..." >&2
    python3 -m venv "$_helix_venv" || return 1 2>/dev/null || exit 1
    "$_helix_venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$_helix_venv/bin/python" -m pip install -q "${HELIX_TORCH_SPEC:-torch==2.13.0}" \
        || { echo "torch install failed" >&2; return 1 2>/dev/null || exit 1; }
    "$_helix_venv/bin/python" -m pip install -q -e "$_helix_root[test]" \
        || { echo "megatron_helix install failed" >&2; return 1 2>/dev/null || exit 1; }
    touch "$_helix_stamp"
fi
# shellcheck disable=SC1091
source "$_helix_venv/bin/activate"
export PYTHONPATH="$_helix_root${PYTHONPATH:+:$PYTHONPATH}"
unset _helix_root _helix_venv _helix_stamp

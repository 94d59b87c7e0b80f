# Source me: creates (once) and activates one of the project's virtual environments.
#
#   source scripts/env.sh [newest|mcore016|mcore019]
#
# The two supported ends of megatron-core, each where its wheels are built for:
#   mcore016  Python 3.11, megatron-core 0.16.1   in .venv-mcore016
#   mcore019  Python 3.12, megatron-core 0.19.2   in .venv-mcore019
# `newest` (the default; HELIX_ENV also chooses) is mcore019 where a Python 3.12 is found
# (python3.12 on PATH, or one of pyenv's), else mcore016.
#
# torch is installed first and pinned, so that installing megatron-core does not resolve
# another torch. Which build arrives depends on the package index: where a local wheel folder
# provides torch's CPU build pip takes it, while PyPI's Linux torch is the CUDA build (a few GB;
# it runs on CPU too). HELIX_TORCH_SPEC picks another torch (e.g. on a GPU box).
# pip keeps no cache: the downloads (about 3 GB for mcore019) would otherwise take their size
# again in ~/.cache/pip, and a CI machine's disk may hold one copy and not two.

_helix_python() {  # the command of a Python $1 (e.g. 3.12): on PATH, or one of pyenv's
    if "python$1" -V >/dev/null 2>&1; then
        echo "python$1"
        return
    fi
    local version
    version="$(pyenv versions --bare 2>/dev/null | grep -E "^$1\.[0-9]+$" | tail -n 1)"
    if [ -n "$version" ]; then echo "env PYENV_VERSION=$version python$1"; fi
}

_helix_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_helix_env="${1:-${HELIX_ENV:-newest}}"
if [ "$_helix_env" = newest ]; then
    if [ -n "$(_helix_python 3.12)" ]; then _helix_env=mcore019; else _helix_env=mcore016; fi
fi
case "$_helix_env" in
    mcore016) _helix_py=3.11 _helix_mcore=0.16.1 ;;
    mcore019) _helix_py=3.12 _helix_mcore=0.19.2 ;;
    *) echo "scripts/env.sh: unknown environment '$_helix_env' (newest, mcore016 or mcore019)" >&2
       return 2 2>/dev/null || exit 2 ;;
esac
_helix_venv="$_helix_root/.venv-$_helix_env"
_helix_stamp="$_helix_venv/.megatron_helix-installed"
if [ ! -f "$_helix_stamp" ] || [ "$_helix_root/setup.py" -nt "$_helix_stamp" ]; then
    _helix_interpreter="$(_helix_python "$_helix_py")"
    if [ -z "$_helix_interpreter" ]; then
        echo "scripts/env.sh: $_helix_env needs Python $_helix_py (python$_helix_py on PATH" \
            "or in pyenv), which this machine lacks" >&2
        return 1 2>/dev/null || exit 1
    fi
    echo "setting up $_helix_venv (Python $_helix_py, megatron-core $_helix_mcore) ..." >&2
    $_helix_interpreter -m venv "$_helix_venv" || return 1 2>/dev/null || exit 1
    "$_helix_venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip >/dev/null
    "$_helix_venv/bin/python" -m pip install -q --no-cache-dir \
        "${HELIX_TORCH_SPEC:-torch==2.13.0}" \
        || { echo "torch install failed" >&2; return 1 2>/dev/null || exit 1; }
    "$_helix_venv/bin/python" -m pip install -q --no-cache-dir "megatron-core==$_helix_mcore" \
        -e "$_helix_root[test]" \
        || { echo "megatron_helix install failed" >&2; return 1 2>/dev/null || exit 1; }
    touch "$_helix_stamp"
fi
# shellcheck disable=SC1091
source "$_helix_venv/bin/activate"
export PYTHONPATH="$_helix_root${PYTHONPATH:+:$PYTHONPATH}"
unset -f _helix_python
unset _helix_root _helix_env _helix_py _helix_mcore _helix_venv _helix_stamp _helix_interpreter

#!/usr/bin/env bash
# Apply the megatron_helix patch to a Megatron-LM source tree at tag core_v0.16.1.
#
# usage: patches/apply.sh MEGATRON_LM_DIR
#
# Accepts a git checkout whose HEAD is the tag's commit, or a source tree without .git (a
# release tarball) whose megatron/core/package_info.py says 0.16.1 and whose patched
# files are byte-identical to the tag's. Refuses, changing nothing, when the tree is another
# release, already patched, or does not take the patch cleanly.
# Exit status: 0 applied, 1 refused, 2 usage.
set -euo pipefail

TAG=core_v0.16.1
TAG_COMMIT=55ac7082517c3878ae653c07c09c534b8aed49f6
# git blob ids of the files the patch edits, at $TAG (what `git hash-object FILE` prints).
TAG_BLOBS=(
    "8eff08d24b20655bb640eb8d2f08f9303ef78495 pretrain_gpt.py"
    "dfe41f7b88e4ed7f052ec62feaaeb3b578620973 gpt_builders.py"
    "c150ac3d5cad8c41b69c11bcff5ac6301f42c6a9 megatron/training/initialize.py"
    "04d05038b20907d9b0a8f650fbe9582fa1f4e055 megatron/training/inprocess_restart.py"
    "46f3c28b1dae1ac20535fe1c92a8fc3bb59c9270 megatron/training/arguments.py"
)
PATCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/megatron-lm-$TAG.patch"

refuse() {
    echo "apply.sh: refusing: $*" >&2
    exit 1
}

[[ $# -eq 1 ]] || { echo "usage: $0 MEGATRON_LM_DIR" >&2; exit 2; }
[[ -d "$1" ]] || refuse "$1 is not a directory"
DIR="$(cd "$1" && pwd -P)"
[[ -f "$DIR/pretrain_gpt.py" && -f "$DIR/megatron/training/initialize.py" ]] ||
    refuse "$DIR is not a Megatron-LM source tree (no pretrain_gpt.py or megatron/training/)"
# Never let git find a repository enclosing DIR: only DIR's own .git counts.
export GIT_CEILING_DIRECTORIES="$(dirname "$DIR")"

if [[ "$(git -C "$DIR" rev-parse --show-toplevel 2>/dev/null)" == "$DIR" ]]; then
    head="$(git -C "$DIR" rev-parse HEAD)"
    if [[ "$head" != "$TAG_COMMIT" ]]; then
        at="$(git -C "$DIR" describe --tags --always 2>/dev/null || echo "$head")"
        refuse "$DIR is at $at, not $TAG ($TAG_COMMIT); run 'git -C $DIR checkout $TAG'," \
            "or port the patch to that release (patches/README.md)"
    fi
    what="git checkout at $TAG"
else
    info="$DIR/megatron/core/package_info.py"
    version="$(awk '/^(MAJOR|MINOR|PATCH) = /{printf "%s%s", sep, $3; sep="."}' "$info" \
        2>/dev/null || true)"
    [[ "$version" == "0.16.1" ]] ||
        refuse "$DIR has no .git and its $info says '${version:-nothing}', not 0.16.1"
    what="source tree of megatron-core $version"
fi

if (cd "$DIR" && git apply --reverse --check "$PATCH") 2>/dev/null; then
    refuse "the patch is already applied to $DIR"
fi
if [[ "$what" != git* ]]; then
    for entry in "${TAG_BLOBS[@]}"; do
        read -r blob file <<<"$entry"
        [[ "$(git hash-object "$DIR/$file")" == "$blob" ]] ||
            refuse "$DIR/$file differs from $TAG's, so the tree cannot be identified as $TAG"
    done
fi
if ! conflicts="$(cd "$DIR" && git apply --check "$PATCH" 2>&1)"; then
    refuse "the patch does not apply cleanly to $DIR (local changes?):"$'\n'"$conflicts"
fi
(cd "$DIR" && git apply "$PATCH")
echo "apply.sh: patched $what in $DIR:"
(cd "$DIR" && git apply --stat "$PATCH")

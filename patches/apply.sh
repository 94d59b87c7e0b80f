#!/usr/bin/env bash
# Apply the megatron_helix patch to a Megatron-LM source tree at a supported release tag.
#
# usage: patches/apply.sh MEGATRON_LM_DIR
#
# Supported tags: core_v0.16.1 and core_v0.19.0, each with its own patch
# (patches/megatron-lm-<tag>.patch). Accepts a git checkout whose HEAD is one tag's commit, or
# a source tree without .git (a release tarball) whose megatron/core/package_info.py says the
# tag's version and whose patched files are byte-identical to the tag's. Refuses, changing
# nothing, when the tree is another release, already patched, or does not take the patch
# cleanly.
# Exit status: 0 applied, 1 refused, 2 usage.
set -euo pipefail

# One row per supported tag: the tag's commit and the version its package_info.py says (tag
# core_v0.19.0 says 0.19.1: the tag was cut after the version bump).
TAGS=(core_v0.16.1 core_v0.19.0)
declare -A TAG_COMMIT=(
    [core_v0.16.1]=55ac7082517c3878ae653c07c09c534b8aed49f6
    [core_v0.19.0]=5be9626709af2722333bf54797c954c09edeada3
)
declare -A TAG_VERSION=(
    [core_v0.16.1]=0.16.1
    [core_v0.19.0]=0.19.1
)
# git blob ids of the files each tag's patch edits, at that tag (what `git hash-object FILE`
# prints), one "blob path" per line.
declare -A TAG_BLOBS=(
    [core_v0.16.1]="\
8eff08d24b20655bb640eb8d2f08f9303ef78495 pretrain_gpt.py
dfe41f7b88e4ed7f052ec62feaaeb3b578620973 gpt_builders.py
c150ac3d5cad8c41b69c11bcff5ac6301f42c6a9 megatron/training/initialize.py
04d05038b20907d9b0a8f650fbe9582fa1f4e055 megatron/training/inprocess_restart.py
46f3c28b1dae1ac20535fe1c92a8fc3bb59c9270 megatron/training/arguments.py"
    [core_v0.19.0]="\
47c1935eb90ccac190b8c2934193e0d91bf99199 pretrain_gpt.py
3512918efe6aa9a934aba0f14fe6aba987ec9cf9 gpt_builders.py
87d6aa65b03298b50353caa0493c92be561a414c megatron/training/initialize.py
5e00b55b2ec1246934aa5b1fdbed2b583d4a9bd6 megatron/training/inprocess_restart.py
fd30984b38ae64e1207a948c71ef04dbaf5925da megatron/training/arguments.py
70f26c64d561b91ab33aa217315e72d38749a1d3 megatron/training/argument_utils.py"
)
PATCHES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"

refuse() {
    echo "apply.sh: refusing: $*" >&2
    exit 1
}

# What would have been accepted, for the refusals: `supported commits` lists
# "core_v0.16.1 (55ac…), core_v0.19.0 (5be9…)", `supported versions` "0.16.1 (core_v0.16.1), ...".
supported() {
    local tag out=""
    for tag in "${TAGS[@]}"; do
        case "$1" in
            commits) out+="${out:+, }$tag (${TAG_COMMIT[$tag]})" ;;
            versions) out+="${out:+, }${TAG_VERSION[$tag]} ($tag)" ;;
        esac
    done
    echo "$out"
}

[[ $# -eq 1 ]] || { echo "usage: $0 MEGATRON_LM_DIR" >&2; exit 2; }
[[ -d "$1" ]] || refuse "$1 is not a directory"
DIR="$(cd "$1" && pwd -P)"
[[ -f "$DIR/pretrain_gpt.py" && -f "$DIR/megatron/training/initialize.py" ]] ||
    refuse "$DIR is not a Megatron-LM source tree (no pretrain_gpt.py or megatron/training/)"
# Never let git find a repository enclosing DIR: only DIR's own .git counts.
export GIT_CEILING_DIRECTORIES="$(dirname "$DIR")"

TAG=""
if [[ "$(git -C "$DIR" rev-parse --show-toplevel 2>/dev/null)" == "$DIR" ]]; then
    head="$(git -C "$DIR" rev-parse HEAD)"
    for tag in "${TAGS[@]}"; do
        [[ "$head" == "${TAG_COMMIT[$tag]}" ]] && TAG="$tag"
    done
    if [[ -z "$TAG" ]]; then
        at="$(git -C "$DIR" describe --tags --always 2>/dev/null || echo "$head")"
        refuse "$DIR is at $at, not a supported tag: $(supported commits); check one of them out" \
            "('git -C $DIR checkout core_v0.19.0'), or port the patch to that release" \
            "(patches/README.md)"
    fi
    what="git checkout at $TAG"
else
    info="$DIR/megatron/core/package_info.py"
    version="$(awk '/^(MAJOR|MINOR|PATCH) = /{printf "%s%s", sep, $3; sep="."}' "$info" \
        2>/dev/null || true)"
    for tag in "${TAGS[@]}"; do
        [[ "$version" == "${TAG_VERSION[$tag]}" ]] && TAG="$tag"
    done
    [[ -n "$TAG" ]] ||
        refuse "$DIR has no .git and its $info says '${version:-nothing}', not one of" \
            "$(supported versions)"
    what="source tree of megatron-core $version ($TAG)"
fi
PATCH="$PATCHES/megatron-lm-$TAG.patch"

if (cd "$DIR" && git apply --reverse --check "$PATCH") 2>/dev/null; then
    refuse "the patch is already applied to $DIR"
fi
if [[ "$what" != git* ]]; then
    while read -r blob file; do
        [[ "$(git hash-object "$DIR/$file")" == "$blob" ]] ||
            refuse "$DIR/$file differs from $TAG's, so the tree cannot be identified as $TAG"
    done <<<"${TAG_BLOBS[$TAG]}"
fi
if ! conflicts="$(cd "$DIR" && git apply --check "$PATCH" 2>&1)"; then
    refuse "the patch does not apply cleanly to $DIR (local changes?):"$'\n'"$conflicts"
fi
(cd "$DIR" && git apply "$PATCH")
echo "apply.sh: patched $what in $DIR with $(basename "$PATCH"):"
(cd "$DIR" && git apply --stat "$PATCH")

"""``patches/`` and ``megatron_helix.launch`` against Megatron-LM's own source.

Every test unpacks a vendored release (``tests/megatron_lm.py``) into its own temporary
directory; nothing is skipped. ``apply.sh`` needs only bash and git, so its tests run on every
supported tag (core_v0.16.1 and core_v0.19.0) in any environment; the tests that import the
tree run ``TAG``, the tag of the installed megatron-core. Argument validation runs Megatron-LM's
own ``parse_args`` / ``validate_args`` / ``core_transformer_config_from_args``; training runs
are in ``test_megatron_lm.py``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest

from tests.megatron_lm import APPLY, ROOT, TAG, TAGS, environment, mend_help, unpack

NEW_FILE = "megatron/training/helix_hooks.py"


def patch_files(tag: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(edited files, new files) of ``tag``'s patch, read from the patch itself."""
    text = (APPLY.parent / f"megatron-lm-{tag}.patch").read_text()
    files = re.findall(r"^diff --git a/(\S+) b/", text, flags=re.M)
    new = tuple(re.findall(r"^diff --git a/(\S+) b/\S+\nnew file mode", text, flags=re.M))
    return tuple(name for name in files if name not in new), new


def set_version(tree: Path, patch: int) -> str:
    """Make ``tree``'s package_info.py say another patch level; returns the new version."""
    info = tree / "megatron/core/package_info.py"
    text = info.read_text()
    major, minor, old = (re.search(rf"^{key} = (\d+)$", text, flags=re.M).group(1)
                         for key in ("MAJOR", "MINOR", "PATCH"))
    info.write_text(text.replace(f"PATCH = {old}\n", f"PATCH = {patch}\n"))
    return f"{major}.{minor}.{patch}"

# Parses, applies and validates each command line (one per stdin line) with Megatron-LM's own
# parse_args / validate_args / core_transformer_config_from_args, in the patched tree.
VALIDATE_COMMANDS = """
import os, shlex, sys
sys.path.insert(0, os.getcwd())
import megatron.training.arguments as margs
from megatron_helix.arguments import apply_helix_args, helix_args_provider
margs.get_device_arch_version = lambda: 9  # what validate_args asks the (absent) GPU: Hopper
for line in sys.stdin:
    words = shlex.split(line)
    argv = words[next(i for i, w in enumerate(words) if w.endswith("pretrain_gpt.py")) + 1:]
    sys.argv = ["pretrain_gpt.py", *argv, "--no-rope-fusion"]  # the fusion needs TE
    try:
        args = margs.parse_args(helix_args_provider(None))
        apply_helix_args(args)
        margs.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
        margs.core_transformer_config_from_args(args)
        result = (f"OK tp={args.tensor_model_parallel_size} "
                  f"pp={args.pipeline_model_parallel_size} cp={args.context_parallel_size} "
                  f"dp={args.data_parallel_size}")
    except Exception as error:
        result = "FAIL " + " ".join(f"{type(error).__name__}: {error}".split())
    print("RESULT", result, flush=True)
"""


def run(*cmd, cwd=None, stdin=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=300, env=environment(**env))


def git(cwd, *args) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def git_checkout(tree: Path) -> Path:
    """``tree`` made a git repository of one commit (not the tag's: its hash differs)."""
    git(tree, "init", "--quiet")
    git(tree, "add", "-A")
    git(tree, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "tree")
    return tree


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """An unmodified tree at ``TAG`` (for the launcher)."""
    return unpack(tmp_path_factory.mktemp("pristine"))


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    """A tree at ``TAG`` patched by apply.sh."""
    tree = unpack(tmp_path_factory.mktemp("patched"))
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 0, proc.stderr
    return tree


# ------------------------------------------------------------------------------ apply.sh


@pytest.mark.parametrize("tag", TAGS)
def test_applies_cleanly_and_the_patched_files_compile(tag, tmp_path):
    tree = unpack(tmp_path, tag)
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 0, proc.stderr
    assert "patched source tree of megatron-core" in proc.stdout
    assert f"({tag}) in {tree} with megatron-lm-{tag}.patch" in proc.stdout
    edited, new = patch_files(tag)
    assert new == (NEW_FILE,) and "pretrain_gpt.py" in edited
    for name in (*edited, *new):
        assert name in proc.stdout
    compiled = run(sys.executable, "-m", "py_compile", *(tree / f for f in (*edited, *new)))
    assert compiled.returncode == 0, compiled.stderr


@pytest.mark.parametrize("tag", TAGS)
def test_refuses_a_second_application(tag, tmp_path):
    tree = unpack(tmp_path, tag)
    assert run("bash", APPLY, tree).returncode == 0
    before = (tree / "megatron/training/initialize.py").read_text()
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 1 and "already applied" in proc.stderr
    assert (tree / "megatron/training/initialize.py").read_text() == before


@pytest.mark.parametrize("tag", TAGS)
def test_refuses_a_git_checkout_at_another_commit(tag, tmp_path):
    tree = git_checkout(unpack(tmp_path, tag))
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 1 and "not a supported tag" in proc.stderr
    assert all(supported in proc.stderr for supported in TAGS)
    assert git(tree, "status", "--porcelain") == ""


@pytest.mark.parametrize("tag", TAGS)
def test_refuses_a_tree_that_differs_or_is_another_release(tag, tmp_path):
    tree = unpack(tmp_path / "edited", tag)
    builders = tree / "gpt_builders.py"
    builders.write_text("# a fork\n" + builders.read_text())
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 1 and f"gpt_builders.py differs from {tag}'s" in proc.stderr
    assert builders.read_text().startswith("# a fork")

    older = unpack(tmp_path / "older", tag)
    version = set_version(older, 0)  # 0.16.0, 0.19.0: neither is a supported tag's
    proc = run("bash", APPLY, older)
    assert proc.returncode == 1 and f"says '{version}', not one of" in proc.stderr
    assert not (older / NEW_FILE).exists()


def test_refuses_a_tree_whose_version_names_another_tag(tmp_path):
    """A core_v0.19.0 tree claiming 0.16.1 is checked against core_v0.16.1's files, and
    refused: the version only chooses which tag's blob ids must match."""
    newer, older = TAGS[-1], TAGS[0]
    tree = unpack(tmp_path, newer)
    set_version(tree, 1)
    info = tree / "megatron/core/package_info.py"
    info.write_text(info.read_text().replace("MINOR = 19", "MINOR = 16"))
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 1 and f"differs from {older}'s" in proc.stderr
    assert not (tree / NEW_FILE).exists()


def test_refuses_what_is_not_megatron_lm(tmp_path):
    proc = run("bash", APPLY, tmp_path)
    assert proc.returncode == 1 and "is not a Megatron-LM source tree" in proc.stderr
    assert run("bash", APPLY).returncode == 2


# ------------------------------------------------------------------- the patched tree


CONTRADICTION = ["--helix-m", "4", "--helix-n", "4", "--tensor-model-parallel-size", "8",
                 "--num-layers", "4", "--hidden-size", "4096", "--num-attention-heads", "32",
                 "--seq-length", "10000", "--max-position-embeddings", "10000", "--mock-data"]


def test_recipes_pass_megatron_validation(patched):
    """Every recipe layout parses, applies and validates with Megatron-LM's own code on 16
    ranks; seed 003's own L2 budget is refused by the layer-wise planner, with its reasons."""
    recipes = sorted((ROOT / "examples" / "recipes").glob("[a-e]_*.sh"))
    lines = [
        run("bash", recipe, layout, DRY_RUN="1", MEGATRON_LM_DIR=str(patched)).stdout
        for recipe in recipes for layout in ("proposed", "tp8pp2", "tp16")
    ]
    seed003 = ROOT / "examples" / "recipes" / "e_seed003_layerwise16.sh"
    lines.append(run("bash", seed003, "proposed", DRY_RUN="1", CACHE_BUDGET="50MB",
                     MEGATRON_LM_DIR=str(patched)).stdout)
    proc = run(sys.executable, "-c", VALIDATE_COMMANDS, cwd=patched, stdin="".join(lines),
               WORLD_SIZE="16")
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == len(lines), proc.stderr[-3000:]
    *layouts, refused = results
    for command, result in zip(lines, layouts):
        assert result.startswith("OK") and "dp=1" in result, f"{command}\n{result}"
    assert "--helix-cache-budget 50MB: no cut of 16 decoder layers" in refused
    expected = {"d_seed004_ring16_seq100k.sh": "tp=1 pp=1 cp=16",
                "e_seed003_layerwise16.sh": "tp=1 pp=16 cp=1"}
    for recipe, proposed in zip(recipes, layouts[::3]):
        assert expected.get(recipe.name, "tp=16 pp=1 cp=1") in proposed, (recipe.name, proposed)


# ---------------------------------------------------------- the launcher, no patch


def test_launcher_help_lists_the_helix_flags(pristine):
    proc = run(sys.executable, "-m", "megatron_helix.launch",
               mend_help(pristine) / "pretrain_gpt.py", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for flag in ("--helix-m", "--helix-n", "--helix-ring-size", "--helix-score-strategy",
                 "--helix-layerwise", "--helix-cache-budget"):
        assert flag in proc.stdout


def test_launcher_fails_at_argument_validation(pristine):
    before = (pristine / "megatron/training/initialize.py").read_text()
    proc = run(sys.executable, "-m", "megatron_helix.launch", "--cpu",
               pristine / "pretrain_gpt.py", *CONTRADICTION, WORLD_SIZE="16", RANK="0")
    assert proc.returncode != 0
    assert ("--tensor-model-parallel-size 8 contradicts --helix-m 4 x --helix-n 4 = 16"
            in proc.stderr), proc.stderr[-3000:]
    assert "initializing torch distributed" not in proc.stdout
    assert (pristine / "megatron/training/initialize.py").read_text() == before


def test_launcher_refuses_a_patched_tree(patched):
    proc = run(sys.executable, "-m", "megatron_helix.launch", patched / "pretrain_gpt.py",
               "--help")
    assert proc.returncode != 0 and "already carries the megatron_helix patch" in proc.stderr


def test_recipe_dry_run_quotes_its_command(pristine):
    """DRY_RUN output is a shell command line (what the validation test feeds Megatron)."""
    recipe = ROOT / "examples" / "recipes" / "a_seed000_dense4.sh"
    line = run("bash", recipe, "proposed", DRY_RUN="1", LAUNCH="launcher",
               MEGATRON_LM_DIR=str(pristine)).stdout
    words = shlex.split(line)
    assert words[:1] == ["torchrun"] and "megatron_helix.launch" in words
    assert words[words.index("--nnodes") + 1] == "2" and "--mock-data" in words

"""``patches/`` and ``megatron_helix.launch`` against a real Megatron-LM core_v0.16.1.

Runs only when ``MEGATRON_LM_DIR`` names a Megatron-LM git repository that has the tag
core_v0.16.1 (skipped otherwise). Nothing there is modified: every test works in its own
worktree of a private clone. The tests that import ``megatron.training`` also need Megatron-LM's
Python dependencies (six, regex, pyyaml, pydantic, triton, ...); they skip, naming the missing
module, where those are absent. ``torch.cuda.is_available`` is faked in those subprocesses so
that ``initialize_megatron`` gets as far as argument validation on a machine without a GPU;
nothing after validation runs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
pytestmark = pytest.mark.skipif(
    not MEGATRON_LM_DIR, reason="set MEGATRON_LM_DIR to a Megatron-LM git repository"
)

ROOT = Path(__file__).resolve().parents[1]
APPLY = ROOT / "patches" / "apply.sh"
TAG = "core_v0.16.1"
PATCHED_FILES = ("pretrain_gpt.py", "gpt_builders.py", "megatron/training/initialize.py",
                 "megatron/training/inprocess_restart.py")

# Runs a training script as __main__ the way `python SCRIPT` would, with CUDA reported present.
FAKE_CUDA_RUN = """
import os, runpy, sys, torch
torch.cuda.is_available = lambda: True
script = os.path.abspath(sys.argv[1])
sys.path.insert(0, os.path.dirname(script))
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

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
    environment = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", **env)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([str(c) for c in cmd], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=300, env=environment)


def git(cwd, *args) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def needs_training_deps(proc: subprocess.CompletedProcess) -> None:
    missing = re.search(r"No module named '([^']+)'", proc.stderr)
    if missing and missing.group(1).split(".")[0] not in ("megatron", "megatron_helix"):
        pytest.skip(f"Megatron-LM's training code needs the Python package for "
                    f"'{missing.group(1)}', which is not installed here")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A private clone sharing MEGATRON_LM_DIR's objects; tests check out worktrees of it."""
    path = tmp_path_factory.mktemp("megatron-lm") / "clone"
    subprocess.run(["git", "clone", "--quiet", "--shared", "--no-checkout", MEGATRON_LM_DIR,
                    str(path)], check=True)
    if TAG not in git(path, "tag", "--list", "core_v0.16.*").split():
        pytest.skip(f"{MEGATRON_LM_DIR} has no tag {TAG}")
    return path


def worktree(clone: Path, ref: str, path: Path) -> Path:
    git(clone, "worktree", "add", "--quiet", "--detach", str(path), ref)
    return path


@pytest.fixture(scope="module")
def pristine(clone, tmp_path_factory) -> Path:
    """An unmodified core_v0.16.1 tree (for the launcher)."""
    return worktree(clone, TAG, tmp_path_factory.mktemp("pristine") / "Megatron-LM")


@pytest.fixture(scope="module")
def patched(clone, tmp_path_factory) -> Path:
    """A core_v0.16.1 tree patched by apply.sh."""
    tree = worktree(clone, TAG, tmp_path_factory.mktemp("patched") / "Megatron-LM")
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 0, proc.stderr
    return tree


# ------------------------------------------------------------------------------ apply.sh


def test_applies_cleanly_and_the_patched_files_compile(clone, tmp_path):
    tree = worktree(clone, TAG, tmp_path / "Megatron-LM")
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 0, proc.stderr
    assert "patched git checkout at core_v0.16.1" in proc.stdout
    assert sorted(git(tree, "diff", "--name-only").split()) == sorted(PATCHED_FILES)
    compiled = run(sys.executable, "-m", "py_compile", *(tree / f for f in PATCHED_FILES))
    assert compiled.returncode == 0, compiled.stderr


def test_refuses_a_second_application(patched):
    before = git(patched, "diff")
    proc = run("bash", APPLY, patched)
    assert proc.returncode == 1 and "already applied" in proc.stderr
    assert git(patched, "diff") == before


def test_refuses_another_tag(clone, tmp_path):
    other = "core_v0.16.0"
    if other not in git(clone, "tag", "--list", other).split():
        pytest.skip(f"{MEGATRON_LM_DIR} has no tag {other}")
    tree = worktree(clone, other, tmp_path / "Megatron-LM")
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 1
    assert f"is at {other}, not {TAG}" in proc.stderr
    assert git(tree, "status", "--porcelain") == ""


def test_refuses_a_tree_that_conflicts(clone, tmp_path):
    tree = worktree(clone, TAG, tmp_path / "Megatron-LM")
    initialize = tree / "megatron/training/initialize.py"
    edited = initialize.read_text().replace(
        "validate_args(args, args_defaults)", "validate_args(args, dict(args_defaults))")
    initialize.write_text(edited)
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 1 and "does not apply cleanly" in proc.stderr
    assert initialize.read_text() == edited
    assert git(tree, "diff", "--name-only") == "megatron/training/initialize.py"


def _source_tree(clone: Path, ref: str, path: Path) -> Path:
    """What a release tarball holds of the files apply.sh looks at, without .git."""
    path.mkdir()
    files = [*PATCHED_FILES, "megatron/core/package_info.py"]
    archive = subprocess.run(["git", "-C", str(clone), "archive", ref, *files],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    return path


def test_source_tree_without_git(clone, tmp_path):
    tree = _source_tree(clone, TAG, tmp_path / "tarball")
    proc = run("bash", APPLY, tree)
    assert proc.returncode == 0, proc.stderr
    assert "source tree of megatron-core 0.16.1" in proc.stdout
    assert "already applied" in run("bash", APPLY, tree).stderr

    changed = _source_tree(clone, TAG, tmp_path / "edited")
    builders = changed / "gpt_builders.py"
    builders.write_text("# a fork\n" + builders.read_text())
    proc = run("bash", APPLY, changed)
    assert proc.returncode == 1 and "gpt_builders.py differs from core_v0.16.1's" in proc.stderr

    if "core_v0.16.0" in git(clone, "tag", "--list").split():
        older = _source_tree(clone, "core_v0.16.0", tmp_path / "older")
        proc = run("bash", APPLY, older)
        assert proc.returncode == 1 and "says '0.16.0', not 0.16.1" in proc.stderr


def test_refuses_what_is_not_megatron_lm(tmp_path):
    proc = run("bash", APPLY, tmp_path)
    assert proc.returncode == 1 and "is not a Megatron-LM source tree" in proc.stderr
    assert run("bash", APPLY).returncode == 2


# ------------------------------------------------------------------- the patched tree


CONTRADICTION = ["--helix-m", "4", "--helix-n", "4", "--tensor-model-parallel-size", "8",
                 "--num-layers", "4", "--hidden-size", "4096", "--num-attention-heads", "32",
                 "--seq-length", "10000", "--max-position-embeddings", "10000", "--mock-data"]


def test_pretrain_gpt_help_lists_the_helix_flags(patched):
    """core_v0.16.1 answers ``--help`` from the early in-process-restart parse; the patch hands
    that parse the same ``extra_args_provider`` as ``pretrain``."""
    proc = run(sys.executable, "pretrain_gpt.py", "--help", cwd=patched)
    needs_training_deps(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--tensor-model-parallel-size" in proc.stdout
    for flag in ("--helix-m", "--helix-n", "--helix-ring-size", "--helix-score-strategy"):
        assert flag in proc.stdout


def test_contradicting_tensor_parallel_size_fails_at_argument_validation(patched):
    proc = run(sys.executable, "-c", FAKE_CUDA_RUN, "pretrain_gpt.py", *CONTRADICTION,
               cwd=patched, WORLD_SIZE="16")
    needs_training_deps(proc)
    assert proc.returncode != 0
    assert "HelixConfigError" in proc.stderr, proc.stderr[-3000:]
    assert ("--tensor-model-parallel-size 8 contradicts --helix-m 4 x --helix-n 4 = 16"
            in proc.stderr)
    # Raised by the patched initialize_megatron, before Megatron's own validate_args.
    assert "in initialize_megatron\n    apply_helix_args(args)" in proc.stderr


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
    needs_training_deps(proc)
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
    proc = run(sys.executable, "-m", "megatron_helix.launch", pristine / "pretrain_gpt.py",
               "--help")
    needs_training_deps(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for flag in ("--helix-m", "--helix-n", "--helix-ring-size", "--helix-score-strategy",
                 "--helix-layerwise", "--helix-cache-budget"):
        assert flag in proc.stdout


def test_launcher_fails_at_argument_validation(pristine):
    launch = FAKE_CUDA_RUN.replace(
        'runpy.run_path(script, run_name="__main__")',
        "from megatron_helix.launch import main; main(sys.argv)")
    proc = run(sys.executable, "-c", launch, pristine / "pretrain_gpt.py", *CONTRADICTION,
               WORLD_SIZE="16")
    needs_training_deps(proc)
    assert ("--tensor-model-parallel-size 8 contradicts --helix-m 4 x --helix-n 4 = 16"
            in proc.stderr), proc.stderr[-3000:]
    assert git(pristine, "status", "--porcelain") == ""


def test_launcher_refuses_a_patched_tree(patched):
    proc = run(sys.executable, "-m", "megatron_helix.launch", patched / "pretrain_gpt.py",
               "--help")
    needs_training_deps(proc)
    assert proc.returncode != 0 and "already carries the megatron_helix patch" in proc.stderr


def test_recipe_dry_run_quotes_its_command(pristine):
    """DRY_RUN output is a shell command line (what the validation test feeds Megatron)."""
    recipe = ROOT / "examples" / "recipes" / "a_seed000_dense4.sh"
    line = run("bash", recipe, "proposed", DRY_RUN="1", LAUNCH="launcher",
               MEGATRON_LM_DIR=str(pristine)).stdout
    words = shlex.split(line)
    assert words[:1] == ["torchrun"] and "megatron_helix.launch" in words
    assert words[words.index("--nnodes") + 1] == "2" and "--mock-data" in words

"""Megatron-LM's own ``pretrain_gpt.py`` (the vendored tag of the installed megatron-core:
core_v0.16.1 or core_v0.19.0, ``tests/megatron_lm.py``; patched) trains every helix layout on
Megatron's own initialization, and its loss curve equals one rank's.

fp32, 5 iterations, mock data, gloo ranks in the CPU mode, ``--use-cpu-initialization`` (Megatron
draws each full weight and splits it; the helix attention reorders the draw so a rank holds
its helix rows of the same weight). Megatron seeds pipeline stage ``p`` with ``seed + 100 p``,
so no pipeline layout equals one rank under Megatron's initialization; helix inside a
pipeline is compared with Megatron's own pipeline of the same depth.
"""

from __future__ import annotations

import functools
import math
import os
import shlex
import subprocess
import sys
import time

import pytest

from tests.megatron_lm import (
    ROOT, assert_same_curve, environment, launch, losses, mend_help, patch, pretrain,
    unpack,
)

HEADS_6 = ["--num-attention-heads", "6", "--num-query-groups", "6", "--hidden-size", "48"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear"]
PP_2 = ["--pipeline-model-parallel-size", "2"]
QWEN3 = ["--qk-layernorm", "--normalization", "RMSNorm", "--swiglu", "--num-query-groups", "2",
         "--rotary-base", "1000000", "--untie-embeddings-and-output-weights",
         "--disable-bias-linear"]

#: name -> (ranks, helix flags, reference ranks, reference flags)
LAYOUTS = {
    "helix 2x2": (4, ["--helix-m", "2", "--helix-n", "2"], 1, []),
    "helix 4x1": (4, ["--helix-m", "4", "--helix-n", "1"], 1, []),
    "helix 2x2, 6 heads": (4, ["--helix-m", "2", "--helix-n", "2", *HEADS_6], 1, HEADS_6),
    "ring 2 x helix 2x1": (4, ["--helix-ring-size", "2", "--helix-m", "2", "--helix-n", "1"],
                           1, []),
    "PP 2 x helix 2x1": (4, [*PP_2, "--helix-m", "2", "--helix-n", "1"], 2, PP_2),
    "MoE x helix 2x2": (4, ["--helix-m", "2", "--helix-n", "2", "--sequence-parallel", *MOE],
                        1, MOE),
    # also 8 heads on 2 query groups: more helix ranks than key/value heads
    "Qwen3-style x helix 2x2": (4, ["--helix-m", "2", "--helix-n", "2", *QWEN3], 1, QWEN3),
}


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    return patch(unpack(tmp_path_factory.mktemp("patched")))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return unpack(tmp_path_factory.mktemp("pristine"))


@pytest.fixture(scope="module")
def reference(patched):
    """The loss curve of a plain Megatron run (memoized per layout)."""

    @functools.lru_cache(maxsize=None)
    def curve(nproc: int, flags: tuple):
        return losses(pretrain(patched, nproc, list(flags)))

    return curve


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_helix_layout_trains_the_one_rank_model(name, patched, reference):
    nproc, flags, ref_nproc, ref_flags = LAYOUTS[name]
    assert_same_curve(losses(pretrain(patched, nproc, flags)), reference(ref_nproc,
                                                                          tuple(ref_flags)))


def test_the_unpatched_launcher_gives_the_same_curve(pristine, reference):
    """The launcher's in-memory hooks on an unmodified tree: helix (1,4), which the patched
    tree is not asked for above, so each layout runs once."""
    curve = losses(pretrain(pristine, 4, ["--helix-m", "1", "--helix-n", "4"]))
    assert_same_curve(curve, reference(1, ()))


RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform",
             "--recompute-num-layers", "1"]
#: layouts whose attention draws dropout masks: the score all-reduce strategy's shared stream,
#: and the ring's position-keyed masks (one seed drawn from the tracker per call)
DROPOUT_LAYOUTS = {
    "helix 2x2 allreduce": ["--helix-m", "2", "--helix-n", "2",
                            "--helix-score-strategy", "allreduce"],
    "ring 2 x helix 2x1": ["--helix-ring-size", "2", "--helix-m", "2", "--helix-n", "1"],
}


@pytest.mark.parametrize("name", list(DROPOUT_LAYOUTS))
def test_recomputation_replays_the_attention_dropout(name, patched, reference):
    """Full recomputation reruns each layer's forward for its gradients; the attention's
    dropout masks come from Megatron's RNG tracker, so the rerun draws the same masks and the
    whole curve (every step's loss depends on the previous steps' gradients) is unchanged. The
    masks are real: without dropout the layout trains the one-rank curve (above), and with it
    another. Gradient by gradient, both strategies and the ring:
    tests/test_recompute_dropout.py."""
    flags = [*DROPOUT_LAYOUTS[name], "--attention-dropout", "0.1"]
    plain = losses(pretrain(patched, 4, flags))
    assert losses(pretrain(patched, 4, [*flags, *RECOMPUTE])) == plain
    assert plain != reference(1, ())


def test_a_helix_checkpoint_resumes_at_one_rank(patched, reference, tmp_path):
    """Saved by helix (2,2) after 3 iterations (``--ckpt-format torch_dist``, Megatron-LM's
    default), resumed by one rank with ``--use-checkpoint-args`` for 2 more: the checkpoint
    holds the standard tensors, so the 5 losses are the uninterrupted one-rank curve. The
    helix flags are parallel sizes, which ``--use-checkpoint-args`` leaves to the command line
    as it does ``--tensor-model-parallel-size``."""
    first = ["--train-iters", "5", "--exit-interval", "3", "--save-interval", "3"]
    saved = ["--helix-m", "2", "--helix-n", "2", *first, "--save", str(tmp_path)]
    got = losses(pretrain(patched, 4, saved, iterations=5))
    got += losses(pretrain(patched, 1, ["--load", str(tmp_path), "--use-checkpoint-args"],
                           iterations=5))
    assert_same_curve(got, reference(1, ()))


IMPOSSIBLE = {
    "heads % n": (["--helix-m", "1", "--helix-n", "4", *HEADS_6],
                  "--helix-n 4 must divide --num-attention-heads 6"),
    "ring with all-to-all context parallelism": (
        ["--helix-ring-size", "2", "--helix-m", "2", "--helix-n", "1", "--cp-comm-type", "a2a"],
        "--cp-comm-type a2a with --helix-ring-size 2"),
}


@pytest.mark.parametrize("name", list(IMPOSSIBLE))
def test_impossible_layout_is_refused_on_every_rank_before_any_process_group(
        name, patched, tmp_path):
    flags, message = IMPOSSIBLE[name]
    start = time.monotonic()
    proc = pretrain(patched, 4, flags, iterations=1, log_dir=tmp_path, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    for rank in range(4):
        log = (tmp_path / str(rank) / "stderr.log").read_text()
        assert message in log, f"rank {rank} did not report: {message}\n{log[-3000:]}"
        assert "HelixConfigError" in log
    assert "initializing torch distributed" not in proc.stdout + proc.stderr
    # A rank that waited for the others would wait out the process-group timeout (Megatron-LM's
    # --distributed-timeout-minutes, 10; torch's gloo default, 30): far more than this bound,
    # which leaves room for a busy machine.
    assert elapsed < 240, f"took {elapsed:.0f} s: some rank waited for the others"


WITHOUT_PLUGIN = """
import runpy, sys
sys.modules["megatron_helix"] = None  # as if it were not installed
sys.path.insert(0, ".")
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["pretrain_mamba.py", "pretrain_gpt.py"])
def test_patched_entry_points_run_without_the_plugin(script, patched):
    env = environment()
    env["PYTHONPATH"] = ""
    proc = subprocess.run([sys.executable, "-c", WITHOUT_PLUGIN, script],
                          cwd=mend_help(patched),
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--tensor-model-parallel-size" in proc.stdout
    assert "--helix-m" not in proc.stdout


def test_patched_pretrain_gpt_help_lists_the_helix_flags(patched):
    proc = subprocess.run([sys.executable, "pretrain_gpt.py", "--help"],
                          cwd=mend_help(patched),
                          capture_output=True, text=True, timeout=300, env=environment())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for flag in ("--helix-m", "--helix-n", "--helix-ring-size", "--helix-score-strategy",
                 "--helix-layerwise", "--helix-cache-budget"):
        assert flag in proc.stdout
    assert os.path.isfile(patched / "megatron" / "training" / "helix_hooks.py")


RECIPES = sorted((ROOT / "examples" / "recipes").glob("[a-e]_*.sh"))


TWIN_LAUNCHER = ["torchrun", "--standalone", "--nproc-per-node", "4", "-m",
                 "megatron_helix.launch"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[recipe.name for recipe in RECIPES])
def test_recipe_cpu_twin_trains_three_iterations(recipe, patched):
    """The recipe's own CPU-twin command (``DRY_RUN=1`` prints it), run on 4 ranks with the
    environment torchrun would give them."""
    dry = subprocess.run(["bash", str(recipe), "proposed"], capture_output=True, text=True,
                         check=True, env=environment(CPU_TWIN="1", DRY_RUN="1",
                                                     MEGATRON_LM_DIR=str(patched)))
    command = shlex.split(dry.stdout)
    assert command[:len(TWIN_LAUNCHER)] == TWIN_LAUNCHER, command
    curve = losses(launch(patched, 4, command[len(TWIN_LAUNCHER):]))
    assert len(curve) == 3 and all(math.isfinite(loss) for loss in curve), curve

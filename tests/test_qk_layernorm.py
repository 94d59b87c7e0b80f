"""Query/key norms (Qwen3 / Gemma 3 style) under helix train the one-device model exactly.

A Qwen3-shaped model (per-head RMSNorm on queries and keys, SwiGLU, GQA with 8 heads on 2
query groups, RoPE base 1e6, untied embeddings, no linear biases) trains 5 Adam steps in fp32
through the plugin trainer on one device, then under helix layouts in one 4-rank world; the
same model with LayerNorm everywhere (qk-norm included, so with norm biases) checks the
mean-subtracting norm.

Every step's loss must agree within 1e-5 relative. Gradients are compared shard by shard with
the one-device gradient cut the same way (so the whole gradient, once every rank has compared
its shard), relative to that parameter's largest one-device entry: within 1e-5 at the first
step, where both runs hold the same weights. Later steps start from weights that differ by
Adam's response to rounding: its first update moves every entry by about ``lr * sign(g)``, so
entries whose gradient is at rounding level move differently by up to ``2 lr``. That lifts the
later gradients' differences to 1e-5 .. 1e-4 with or without q/k norms (helix 2 x 2 without
them: 8e-6 at step 2), so those steps are held to 1e-3, still far below the O(1) errors of a
missing or misplaced norm (a q/k norm applied at the wrong dims is off by > 1 at step 1).
"""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed
from tests.trainer_runs import train_recording

QWEN3 = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
         "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16",
         "--ffn-hidden-size", "128", "--swiglu", "--normalization", "RMSNorm", "--qk-layernorm",
         "--rotary-base", "1000000", "--disable-bias-linear",
         "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--train-iters", "5", "--lr", "3e-3", "--seed", "7"]
MODELS = {
    "qwen3": QWEN3,
    "qwen3, 4 query groups": QWEN3 + ["--num-query-groups", "4"],  # helix n = 4 needs G % 4 == 0
    "qwen3 with LayerNorm": QWEN3 + ["--normalization", "LayerNorm"],
}
LAYOUTS = {
    "helix 2x2 allreduce": ("qwen3", ["--helix-m", "2", "--helix-n", "2",
                                      "--helix-score-strategy", "allreduce"]),
    "helix 2x2 redistribute": ("qwen3", ["--helix-m", "2", "--helix-n", "2",
                                         "--helix-score-strategy", "redistribute"]),
    "helix 4x1": ("qwen3", ["--helix-m", "4", "--helix-n", "1"]),
    "helix 1x4": ("qwen3, 4 query groups", ["--helix-m", "1", "--helix-n", "4"]),
    "LayerNorm helix 2x2": ("qwen3 with LayerNorm", ["--helix-m", "2", "--helix-n", "2"]),
}
TOLERANCE = 1e-5
LATER_STEP_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def references():
    runs = {name: (name, argv) for name, argv in MODELS.items()}
    return run_distributed(train_recording, 1, runs)[0]


@pytest.fixture(scope="module")
def helix_runs(references):
    runs = {name: (model, MODELS[model] + argv) for name, (model, argv) in LAYOUTS.items()}
    per_rank = run_distributed(train_recording, 4, runs, references)
    results = {}
    for name in LAYOUTS:
        losses = per_rank[0][name]["losses"]
        assert all(r[name]["losses"] == losses for r in per_rank), "ranks disagree on the loss"
        # The whole gradient's error: the largest over the ranks' shards.
        steps = [
            {param: (max(r[name]["gradients"][step][param][0] for r in per_rank), scale)
             for param, (_, scale) in per_rank[0][name]["gradients"][step].items()}
            for step in range(len(losses))
        ]
        results[name] = {"losses": losses, "gradients": steps}
    return results


def test_one_device_references_use_the_qk_norms(references):
    for name, run in references.items():
        assert run["losses"][-1] < run["losses"][0], f"{name}: the loss must fall"
        norms = [p for p in run["gradients"][0] if "q_layernorm" in p or "k_layernorm" in p]
        assert len(norms) == (4 if "LayerNorm" in name else 2) * 2, f"{name}: {norms}"
        assert all(run["gradients"][0][p].abs().max() > 0 for p in norms), name


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_helix_with_qk_norm_matches_one_device(name, references, helix_runs):
    reference, run = references[LAYOUTS[name][0]], helix_runs[name]
    assert len(run["losses"]) == len(reference["losses"]) == 5
    loss_errors = [abs(got - want) / abs(want)
                   for want, got in zip(reference["losses"], run["losses"])]
    grad_errors = [max(error / scale for error, scale in errors.values() if scale > 0)
                   for errors in run["gradients"]]
    print(f"\n{name}: largest relative loss difference {max(loss_errors):.2e}; gradients "
          f"{' '.join(f'{e:.2e}' for e in grad_errors)} (steps 1-5)")
    for step, error in enumerate(loss_errors, start=1):
        assert error <= TOLERANCE, f"step {step}: loss off by {error:.3g} relative"
    assert len(run["gradients"]) == 5
    for step, errors in enumerate(run["gradients"], start=1):
        assert errors.keys() == reference["gradients"][step - 1].keys()
        tolerance = TOLERANCE if step == 1 else LATER_STEP_TOLERANCE
        for param, (error, scale) in errors.items():
            assert error <= tolerance * scale, (
                f"step {step}: gradient of {param} off by {error:.3g} (largest entry {scale:.3g})"
            )

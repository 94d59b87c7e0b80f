"""Attention dropout under helix is recompute-safe: it comes from Megatron's RNG tracker.

With ``--recompute-granularity full`` Megatron runs every layer's forward twice: once without
autograd (its output feeds the next layer and the loss) and again in the backward pass, after
restoring the RNG tracker's states. Dropout drawn from a generator outside the tracker would use
another mask the second time, and the gradients would belong to a model that never ran. So one
step with attention dropout 0.1 must give exactly the gradients of the same step without
recomputation (same masks), and other gradients with another seed or without dropout (the
masks are real).

Checked for helix (2,2) with each score strategy and for a ring of 2 around helix (2,1), whose
masks are keyed by position and seeded by one draw from the tracker (``dropout_mask``).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.trainer_runs import train_recording

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
         "--group-query-attention", "--num-query-groups", "4", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
         "--attention-dropout", "0.1"]
HELIX_2x2 = ["--helix-m", "2", "--helix-n", "2", "--helix-score-strategy"]
LAYOUTS = {
    "allreduce": HELIX_2x2 + ["allreduce"],
    "redistribute": HELIX_2x2 + ["redistribute"],
    "ring 2 x helix 2x1": ["--helix-ring-size", "2", "--helix-m", "2", "--helix-n", "1"],
}
RECOMPUTE = ["--recompute-granularity", "full"]


def _runs():
    runs = {}
    for strategy, layout in LAYOUTS.items():
        argv = MODEL + layout
        runs[strategy] = (strategy, argv + ["--seed", "7"])
        runs[strategy + " recompute"] = (strategy, argv + ["--seed", "7", *RECOMPUTE])
        runs[strategy + " other seed"] = (strategy, argv + ["--seed", "8", *RECOMPUTE])
        runs[strategy + " no dropout"] = (strategy, argv + ["--seed", "7", *RECOMPUTE,
                                                            "--attention-dropout", "0"])
    return runs


@pytest.fixture(scope="module")
def gradients():
    """``{run: [per-rank {parameter: gradient of step 1}]}`` on 4 ranks."""
    per_rank = run_distributed(train_recording, 4, _runs())
    return {name: [ranks[name]["gradients"][0] for ranks in per_rank] for name in _runs()}


@pytest.mark.parametrize("strategy", LAYOUTS)
def test_recomputation_replays_the_dropout_masks(strategy, gradients):
    plain, recomputed = gradients[strategy], gradients[strategy + " recompute"]
    for rank, (want, got) in enumerate(zip(plain, recomputed)):
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(want[name], got[name]), f"rank {rank}: {name} differs"


@pytest.mark.parametrize("other", ["other seed", "no dropout"])
@pytest.mark.parametrize("strategy", LAYOUTS)
def test_the_masks_are_real(strategy, other, gradients):
    """Another seed, or no dropout at the same seed, gives other gradients."""
    first, second = gradients[strategy + " recompute"], gradients[f"{strategy} {other}"]
    attention = [name for name in first[0] if "linear_qkv.weight" in name]
    assert attention
    for rank in range(len(first)):
        for name in attention:
            assert not torch.allclose(first[rank][name], second[rank][name]), (rank, name)

"""Whole-model exactness: 5 optimizer steps under each layout give the one-device losses.

Layouts run inside one spawned 4-rank world each (the parallel state is rebuilt between
them); the references run in a 1-rank world. Same seed => same weights and data everywhere
(``sharding.init_from_seed``, ``synthetic_data``), so the losses must agree to float rounding.
"""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
         "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--train-iters", "5", "--lr", "3e-3", "--seed", "5"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear"]

DENSE_LAYOUTS = {
    "helix 2x2": ["--helix-m", "2", "--helix-n", "2"],
    "helix 4x1": ["--helix-m", "4", "--helix-n", "1"],
    "TP=4": ["--tensor-model-parallel-size", "4"],
    "PP=2 x helix 2x1": ["--pipeline-model-parallel-size", "2", "--helix-m", "2", "--helix-n", "1"],
    "ring R=4": ["--helix-ring-size", "4"],
    "ring R=2 (--context-parallel-size)": ["--context-parallel-size", "2",
                                           "--micro-batch-size", "1"],
    "ring R=2 x helix 2x1": ["--helix-ring-size", "2", "--helix-m", "2", "--helix-n", "1"],
    "ring R=2 x PP=2": ["--helix-ring-size", "2", "--pipeline-model-parallel-size", "2"],
}
MOE_LAYOUTS = {"MoE helix 2x2": ["--helix-m", "2", "--helix-n", "2"]}
# More ranks than heads: 2 heads of 32 dims on helix 2 x 2 (plain TP=4 cannot split 2 heads).
FEW_HEADS = ["--num-attention-heads", "2"]
# Layer-wise: one layer per stage, and the planner's uneven cut "Et|t*2|t*2|tL" of 6 layers.
LAYERWISE_LAYOUTS = {
    "layer-wise 4 layers on 4 stages": ("4 layers", ["--num-layers", "4", "--helix-layerwise"]),
    "layer-wise planned 6 layers, 4 stages, 4MB": (
        "6 layers", ["--num-layers", "6", "--helix-layerwise", "--pipeline-model-parallel-size",
                     "4", "--helix-cache-budget", "4MB"]),
}
FEW_HEADS_LAYOUTS = {"helix 2x2 on 2 heads": ["--helix-m", "2", "--helix-n", "2"],
                     "helix 4x1 on 2 heads": ["--helix-m", "4", "--helix-n", "1"]}


def _train_many(rank, world_size, runs):
    from megatron_helix.trainer import build_parser, train

    # Later flags win: a layout may override the micro-batch size (global batch stays 4).
    return {name: [m["loss"] for m in train(build_parser().parse_args(argv))]
            for name, argv in runs.items()}


@pytest.fixture(scope="module")
def references():
    runs = {"dense": MODEL, "moe": MODEL + MOE, "few heads": MODEL + FEW_HEADS}
    runs.update({f"{layers} layers": MODEL + ["--num-layers", layers] for layers in ("4", "6")})
    return run_distributed(_train_many, 1, runs)[0]


@pytest.fixture(scope="module")
def parallel_runs():
    runs = {name: MODEL + argv for name, argv in DENSE_LAYOUTS.items()}
    runs.update({name: MODEL + MOE + argv for name, argv in MOE_LAYOUTS.items()})
    runs.update({name: MODEL + FEW_HEADS + argv for name, argv in FEW_HEADS_LAYOUTS.items()})
    runs.update({name: MODEL + argv for name, (_, argv) in LAYERWISE_LAYOUTS.items()})
    results = run_distributed(_train_many, 4, runs)
    for other in results[1:]:
        assert other == results[0], "every rank must report the same losses"
    return results[0]


def _assert_same_curve(reference, candidate, name):
    assert len(candidate) == len(reference) == 5
    for step, (a, b) in enumerate(zip(reference, candidate), start=1):
        assert abs(a - b) / abs(a) < 1e-4, f"{name}: step {step} loss {b} vs one device {a}"


@pytest.mark.parametrize("name", list(DENSE_LAYOUTS))
def test_dense_layouts_match_one_device(name, references, parallel_runs):
    assert references["dense"][-1] < references["dense"][0], "the loss must fall"
    _assert_same_curve(references["dense"], parallel_runs[name], name)


@pytest.mark.parametrize("name", list(MOE_LAYOUTS))
def test_moe_with_helix_attention_matches_one_device(name, references, parallel_runs):
    _assert_same_curve(references["moe"], parallel_runs[name], name)


@pytest.mark.parametrize("name", list(FEW_HEADS_LAYOUTS))
def test_more_helix_ranks_than_heads_matches_one_device(name, references, parallel_runs):
    _assert_same_curve(references["few heads"], parallel_runs[name], name)


@pytest.mark.parametrize("name", list(LAYERWISE_LAYOUTS))
def test_layerwise_pipelines_match_one_device(name, references, parallel_runs):
    _assert_same_curve(references[LAYERWISE_LAYOUTS[name][0]], parallel_runs[name], name)

"""A distributed checkpoint written under helix holds the standard tensors and loads anywhere.

Megatron's ``dist_checkpointing`` (what ``--ckpt-format torch_dist`` writes) on gloo ranks:
a model saved at helix (2,2) loads at one rank (Megatron's own local spec), TP 2, helix (4,1),
helix (1,4) and PP 2 x helix (2,1); one-rank and TP 2 checkpoints load at helix (2,2). Every loaded
tensor must equal, exactly, what the same seed builds at the loading layout (the plugin's
initialization gives every layout the same model), so a scrambled QKV row or projection column
fails. Before the helix attention described its shards as pieces of the standard tensors, the
(2,2) checkpoint loaded everywhere without an error and with scrambled attention weights.
"""

from __future__ import annotations

import os

import pytest

from tests.distributed import run_distributed

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
         "--group-query-attention", "--num-query-groups", "4", "--seq-length", "32",
         "--micro-batch-size", "2"]
SAVED_SEED, OTHER_SEED = "7", "99"
HELIX_2x2 = ["--helix-m", "2", "--helix-n", "2"]
LOAD_LAYOUTS = {
    "TP 2": ["--tensor-model-parallel-size", "2"],
    "helix 4x1": ["--helix-m", "4", "--helix-n", "1"],
    "helix 1x4": ["--helix-m", "1", "--helix-n", "4"],
    "PP 2 x helix 2x1": ["--pipeline-model-parallel-size", "2", "--helix-m", "2",
                         "--helix-n", "1"],
}


def _model(layout, seed):
    from megatron_helix.trainer import build_model, build_parser, initialize, transformer_config

    args = build_parser().parse_args([*MODEL, *layout, "--seed", seed])
    return build_model(args, transformer_config(args, initialize(args)))


def _save(rank, world_size, layout, directory):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_helix.trainer import teardown

    if rank == 0:
        os.makedirs(directory)
    dist.barrier()
    dist_checkpointing.save(_model(layout, SAVED_SEED).sharded_state_dict(), directory)
    teardown()


def _load(rank, world_size, loads):
    """``{name: largest |loaded - expected|}`` for each ``name: (layout, directory)``."""
    from megatron.core import dist_checkpointing

    from megatron_helix.trainer import teardown

    errors = {}
    for name, (layout, directory) in loads.items():
        expected = dict(_model(layout, SAVED_SEED).named_parameters())
        teardown()
        model = _model(layout, OTHER_SEED)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))
        errors[name] = max(float((param - expected[key]).abs().max())
                           for key, param in model.named_parameters())
        teardown()
    return errors


#: models the helix (2,2) checkpoint does not cover exactly: -> what loading them must say
MISMATCHED = {
    "a layer the checkpoint lacks": (["--num-layers", "3"], "Global shape mismatch"),
    "other key/value heads": (["--num-query-groups", "2"], "linear_qkv"),
}


def _mismatch_errors(directory):
    """``{name: the error loading the checkpoint raised}`` for each ``MISMATCHED`` model."""
    from megatron.core import dist_checkpointing

    from megatron_helix.trainer import teardown

    errors = {}
    for name, (shape, _) in MISMATCHED.items():
        model = _model(shape, OTHER_SEED)
        try:
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))
            errors[name] = None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # torch's CheckpointException is a BaseException
            errors[name] = f"{type(error).__name__}: {error}"
        teardown()
    return errors


def _save_then_load(rank, world_size, save, loads, mismatched_from=None):
    """Save ``save = (layout, directory)``, then ``_load`` (and, given a checkpoint
    directory, load it into the ``MISMATCHED`` models)."""
    _save(rank, world_size, *save)
    errors = _load(rank, world_size, loads)
    if mismatched_from is not None:
        errors["mismatched"] = _mismatch_errors(mismatched_from)
    return errors


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: str(root / name.replace(" ", "_")) for name in ("helix 2x2", "one rank", "TP 2")}


@pytest.fixture(scope="module")
def one_rank_errors(checkpoints):
    run_distributed(_save, 4, HELIX_2x2, checkpoints["helix 2x2"])
    return run_distributed(_save_then_load, 1, ([], checkpoints["one rank"]),
                           {"one rank": ([], checkpoints["helix 2x2"])},
                           checkpoints["helix 2x2"])[0]


@pytest.fixture(scope="module")
def four_rank_errors(checkpoints, one_rank_errors):
    loads = {name: (layout, checkpoints["helix 2x2"]) for name, layout in LOAD_LAYOUTS.items()}
    loads["helix 2x2 from one rank"] = (HELIX_2x2, checkpoints["one rank"])
    loads["helix 2x2 from TP 2"] = (HELIX_2x2, checkpoints["TP 2"])
    per_rank = run_distributed(
        _save_then_load, 4, (LOAD_LAYOUTS["TP 2"], checkpoints["TP 2"]), loads)
    return {name: max(errors[name] for errors in per_rank) for name in loads}


def test_helix_checkpoint_loads_at_one_rank(one_rank_errors):
    assert one_rank_errors["one rank"] == 0.0


@pytest.mark.parametrize("name", list(MISMATCHED))
def test_a_checkpoint_that_does_not_cover_the_model_fails_loudly(name, one_rank_errors):
    error = one_rank_errors["mismatched"][name]
    assert error is not None, f"{name}: loaded without an error"
    assert MISMATCHED[name][1] in error, error


@pytest.mark.parametrize("name", [*LOAD_LAYOUTS, "helix 2x2 from one rank",
                                  "helix 2x2 from TP 2"])
def test_checkpoint_loads_at_another_layout(name, four_rank_errors):
    assert four_rank_errors[name] == 0.0, f"{name}: loaded weights off by {four_rank_errors[name]}"

"""Save at one layout, resume at another: the trainer's loss curve goes on as if uninterrupted.

Three steps at layout A with ``--save``, three more at layout B with ``--load``: the six losses
equal an uninterrupted six-step run at A within 1e-5 relative (the model, Adam's moments and
the data position all come back; fp32 on gloo ranks). Also: a save that dies before the tracker
file is replaced leaves the previous checkpoint as the one that loads.

With the distributed optimizer (its model-space ``fully_reshardable`` format): helix (2,2) ->
helix (1,4), and helix (2,1) x data parallel 2, whose Adam state is sharded over the two
data-parallel ranks, -> helix (2,2).
"""

from __future__ import annotations

import multiprocessing
import os

import pytest

from tests.distributed import run_distributed

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
         "--group-query-attention", "--num-query-groups", "4", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--seed", "11"]
TP1: list = []
HELIX_2x2 = ["--helix-m", "2", "--helix-n", "2"]
HELIX_4x1 = ["--helix-m", "4", "--helix-n", "1"]
DISTOPT = ["--use-distributed-optimizer"]
HELIX_2x2_DO = HELIX_2x2 + DISTOPT
HELIX_1x4_DO = ["--helix-m", "1", "--helix-n", "4", *DISTOPT]
HELIX_2x1_DP2_DO = ["--helix-m", "2", "--helix-n", "1", *DISTOPT]
TOLERANCE = 1e-5


def _train(rank, world_size, runs):
    """Run ``[(name, argv)]`` in order; return ``{name: losses}``."""
    from megatron_helix.trainer import build_parser, train

    return {name: [m["loss"] for m in train(build_parser().parse_args(MODEL + argv))]
            for name, argv in runs}


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    saved = {name: str(root / name) for name in ("tp1", "helix", "helix do", "dp2 do")}

    def save(layout, name):
        return layout + ["--train-iters", "3", "--save", saved[name]]

    def resume(layout, name):
        return layout + ["--train-iters", "6", "--load", saved[name]]

    six = ["--train-iters", "6"]
    curves = run_distributed(_train, 1, [
        ("TP 1, 6 steps", TP1 + six), ("TP 1, first 3", save(TP1, "tp1")),
    ])[0]
    curves.update(run_distributed(_train, 4, [
        ("helix 2x2, 6 steps", HELIX_2x2 + six),
        ("helix 2x2, first 3", save(HELIX_2x2, "helix")),
        ("helix 2x2 -> helix 4x1", resume(HELIX_4x1, "helix")),
        ("TP 1 -> helix 2x2", resume(HELIX_2x2, "tp1")),
        ("helix 2x2 DO, 6 steps", HELIX_2x2_DO + six),
        ("helix 2x2 DO, first 3", save(HELIX_2x2_DO, "helix do")),
        ("helix 2x2 DO -> helix 1x4 DO", resume(HELIX_1x4_DO, "helix do")),
        ("helix 2x1 x DP 2 DO, 6 steps", HELIX_2x1_DP2_DO + six),
        ("helix 2x1 x DP 2 DO, first 3", save(HELIX_2x1_DP2_DO, "dp2 do")),
        ("helix 2x1 x DP 2 DO -> helix 2x2 DO", resume(HELIX_2x2_DO, "dp2 do")),
    ])[0])
    curves.update(run_distributed(_train, 1, [
        ("helix 2x2 -> TP 1", resume(TP1, "helix")),
    ])[0])
    return curves


@pytest.mark.parametrize("first, resumed", [
    ("helix 2x2", "helix 2x2 -> TP 1"),
    ("TP 1", "TP 1 -> helix 2x2"),
    ("helix 2x2", "helix 2x2 -> helix 4x1"),
    ("helix 2x2 DO", "helix 2x2 DO -> helix 1x4 DO"),
    ("helix 2x1 x DP 2 DO", "helix 2x1 x DP 2 DO -> helix 2x2 DO"),
])
def test_resume_at_another_layout_continues_the_curve(first, resumed, curves):
    uninterrupted = curves[f"{first}, 6 steps"]
    got = curves[f"{first}, first 3"] + curves[resumed]
    assert len(got) == len(uninterrupted) == 6
    for step, (want, have) in enumerate(zip(uninterrupted, got), start=1):
        assert abs(have - want) <= TOLERANCE * abs(want), (step, got, uninterrupted)


def _killed_save(rank, world_size, directory):
    """Save iteration 3, then die inside the save of iteration 6 (after the data is written,
    before the tracker file moves): iteration 3 must be the one that loads."""
    from megatron_helix import trainer_checkpoint
    from megatron_helix.trainer import build_parser, train

    train(build_parser().parse_args(MODEL + ["--train-iters", "3", "--save", directory]))
    original = os.replace

    def die(source, target):
        if target.endswith(trainer_checkpoint.TRACKER):
            # The process is gone before the tracker names iteration 6. Its children go too
            # (megatron-core's writer keeps a multiprocessing manager), or they outlive the test.
            for child in multiprocessing.active_children():
                child.kill()
            os._exit(0)
        return original(source, target)

    trainer_checkpoint.os.replace = die
    try:
        train(build_parser().parse_args(MODEL + ["--train-iters", "6", "--load", directory,
                                                 "--save", directory]))
    finally:
        trainer_checkpoint.os.replace = original


def _resume_from(rank, world_size, directory):
    from megatron_helix.trainer import build_parser, train

    return [m["iteration"] for m in train(build_parser().parse_args(
        MODEL + ["--train-iters", "4", "--load", directory]))]


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    with pytest.raises(Exception):
        run_distributed(_killed_save, 1, directory)
    assert os.path.isdir(os.path.join(directory, "iter_0000006"))  # written, never named
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "3"
    assert run_distributed(_resume_from, 1, directory)[0] == [4]

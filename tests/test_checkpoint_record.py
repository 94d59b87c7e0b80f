"""Checkpoints no layout can read are refused at argument time, naming both layouts.

A checkpoint written at ``--helix-m`` > 1 by a megatron_helix that saved attention weights in
helix order looks exactly like a TP checkpoint and would load scrambled; since then every helix
checkpoint records that its tensors are standard (``checkpoint_record``). Formats that would
store a rank's helix-ordered rows as they are (legacy ``torch``, the distributed optimizer's
flattened ``dp_reshardable``) are refused with helix m > 1 when the run saves or loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from megatron_helix.arguments import HelixConfigError, apply_helix_args
from megatron_helix.checkpoint_record import (
    LAYOUT_KEY, STANDARD_LAYOUT, TRACKER, layout_record, saved_record,
)
from tests.test_arguments import megatron_parser

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
         "--seq-length", "32", "--micro-batch-size", "1"]
HELIX_2x2 = ["--helix-m", "2", "--helix-n", "2"]


def _apply(*argv: str) -> argparse.Namespace:
    args = megatron_parser().parse_args([*MODEL, *argv])
    apply_helix_args(args, world_size=4)
    return args


def _checkpoint(directory: Path, record, iteration: int = 3, legacy: bool = False) -> Path:
    """A Megatron-LM-shaped checkpoint directory whose saved record is ``record``."""
    path = directory / f"iter_{iteration:07d}"
    key = "args" if isinstance(record, argparse.Namespace) else "layout"
    if legacy:
        (path / "mp_rank_00").mkdir(parents=True)
        torch.save({key: record, "model": {}}, path / "mp_rank_00" / "model_optim_rng.pt")
    else:
        path.mkdir(parents=True)
        torch.save({key: record, "iteration": iteration}, path / "common.pt")
    (directory / TRACKER).write_text(f"{iteration}\n")
    return directory


OLD_HELIX = argparse.Namespace(helix_m=2, helix_n=2, num_layers=2)


@pytest.mark.parametrize("run", [[], HELIX_2x2, ["--helix-m", "4", "--helix-n", "1"]],
                         ids=["plain TP", "helix 2x2", "helix 4x1"])
@pytest.mark.parametrize("legacy", [False, True], ids=["torch_dist", "legacy torch"])
def test_an_old_helix_ordered_checkpoint_is_refused_at_every_layout(tmp_path, run, legacy):
    load = _checkpoint(tmp_path, OLD_HELIX, legacy=legacy)
    with pytest.raises(HelixConfigError) as error:
        _apply(*run, "--load", str(load))
    message = str(error.value)
    assert f"--load {load}" in message
    assert "--helix-m 2 --helix-n 2" in message and "helix order" in message


def test_the_record_of_a_standard_checkpoint_lets_every_layout_load(tmp_path, capsys):
    saved = _apply(*HELIX_2x2, "--save", str(tmp_path))
    assert getattr(saved, LAYOUT_KEY) == STANDARD_LAYOUT  # what Megatron-LM saves with it
    load = _checkpoint(tmp_path, saved)
    for run in ([], HELIX_2x2, ["--helix-m", "1", "--helix-n", "4"]):
        _apply(*run, "--load", str(load))
    said = capsys.readouterr().out.splitlines()
    assert [line.split("this run reads them at ")[1] for line in said] == [
        "helix (1,1)", "helix (1,4)"], said  # another layout is said, the same one is not
    assert "saved at helix (2,2) with its attention tensors in the standard layout" in said[0]


def test_the_trainers_layout_record_is_read_too(tmp_path):
    _apply(*HELIX_2x2, "--load", str(_checkpoint(tmp_path / "new", layout_record(2, 2))))
    old = _checkpoint(tmp_path / "old", {"world": 4, "tp": 4, "helix_m": 2, "helix_n": 2})
    with pytest.raises(HelixConfigError, match="helix order"):
        _apply("--load", str(old))


def test_a_record_this_release_cannot_map_is_refused(tmp_path):
    future = argparse.Namespace(helix_m=2, helix_n=2, **{LAYOUT_KEY: "helix-v3"})
    with pytest.raises(HelixConfigError, match="'helix-v3' layout, which this"):
        _apply("--pretrained-checkpoint", str(_checkpoint(tmp_path, future)))


def test_checkpoints_that_need_no_record_load(tmp_path):
    """Plain Megatron-LM checkpoints, helix (1, n) ones (their order is the standard one),
    and directories with no complete checkpoint yet (``--save`` and ``--load`` alike)."""
    _apply(*HELIX_2x2, "--load", str(_checkpoint(tmp_path / "tp", argparse.Namespace())))
    one_by_four = argparse.Namespace(helix_m=1, helix_n=4)
    _apply(*HELIX_2x2, "--load", str(_checkpoint(tmp_path / "1x4", one_by_four)))
    _apply(*HELIX_2x2, "--load", str(tmp_path / "empty"), "--save", str(tmp_path / "empty"))


def test_ckpt_step_picks_the_iteration(tmp_path):
    _checkpoint(tmp_path, argparse.Namespace(), iteration=6)
    _checkpoint(tmp_path, OLD_HELIX, iteration=3)  # the tracker now names 3
    (tmp_path / TRACKER).write_text("6\n")
    assert saved_record(str(tmp_path)) == argparse.Namespace()
    with pytest.raises(HelixConfigError):
        _apply("--load", str(tmp_path), "--ckpt-step", "3")


@pytest.mark.parametrize("argv, message", [
    (["--ckpt-format", "torch"], "--ckpt-format torch with --helix-m 2"),
    (["--ckpt-format", "torch_dcp"], "--ckpt-format torch_dcp with --helix-m 2"),
    (["--use-distributed-optimizer"], "add --dist-ckpt-optim-fully-reshardable"),
])
def test_formats_that_would_store_helix_order_are_refused(tmp_path, argv, message):
    with pytest.raises(HelixConfigError, match=message):
        _apply(*HELIX_2x2, *argv, "--save", str(tmp_path))


@pytest.mark.parametrize("layout, argv", [
    (["--helix-m", "1", "--helix-n", "4"], ["--ckpt-format", "torch"]),  # the standard order
    (HELIX_2x2, ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"]),
])
def test_formats_that_keep_the_standard_order_are_allowed(tmp_path, layout, argv):
    _apply(*layout, *argv, "--save", str(tmp_path))


def test_a_run_that_neither_saves_nor_loads_takes_any_format():
    _apply(*HELIX_2x2, "--ckpt-format", "torch")

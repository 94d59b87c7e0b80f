"""One set of model-shape flags for the trainer, ``megatron-helix plan`` and the layer-wise
planner: same flags, same attribute names and meanings (Megatron-LM's), each caller's own
defaults and required flags; and the trainer's ``--help`` printed once under torchrun."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_helix import cli, trainer
from megatron_helix.layerwise import ModelShape, cli as layerwise_cli, plan_from_args
from megatron_helix.model_args import add_model_shape_args, model_shape_kwargs
from megatron_helix.perf.planner import PRESETS

ROOT = Path(__file__).resolve().parents[1]

# Every shape flag, none at its default.
COMMON = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
          "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "64",
          "--ffn-hidden-size", "1024", "--seq-length", "128", "--vocab-size", "1000",
          "--num-experts", "4", "--moe-router-topk", "1", "--disable-bias-linear",
          "--position-embedding-type", "rope", "--rotary-interleaved", "--rotary-base", "500000",
          "--swiglu", "--normalization", "RMSNorm", "--qk-layernorm",
          "--untie-embeddings-and-output-weights", "--attention-dropout", "0.0",
          "--hidden-dropout", "0.05", "--recompute-granularity", "selective"]
# What the planners need besides the shape.
LAYERWISE_REST = ["--micro-batch-size", "2", "--mode", "weights", "--budget", "80GB",
                  "--pipeline-model-parallel-size", "2"]
LAYERWISE_REQUIRED = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
                      "--ffn-hidden-size", "1024", "--seq-length", "128"]


def megatron_defaults() -> dict:
    """The shape flags alone, at Megatron-LM's defaults."""
    return vars(_bare_parser().parse_args([]))


def _bare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_model_shape_args(parser)
    return parser


def shape(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in megatron_defaults()}


def parse_all(argv):
    """``argv`` through each of the three command lines: {name: namespace}."""
    return {
        "trainer": trainer.build_parser().parse_args(argv),
        "plan": cli.build_parser().parse_args(["plan", *argv]),
        "layerwise": layerwise_cli._parser().parse_args([*argv, *LAYERWISE_REST]),
    }


def test_the_three_command_lines_read_one_shape_alike():
    parsed = parse_all(COMMON)
    expected = shape(_bare_parser().parse_args(COMMON))
    assert expected["swiglu"] is True and expected["add_bias_linear"] is False  # Megatron's dests
    assert expected["num_query_groups"] == 2 and expected["rotary_base"] == 500000
    assert all(value != megatron_defaults()[name] for name, value in expected.items())
    for name, args in parsed.items():
        assert shape(args) == expected, name
        assert not hasattr(args, "disable_bias_linear") and not hasattr(args, "gated_linear_unit")


def test_both_planners_build_the_same_model():
    parsed = parse_all(COMMON)
    kwargs = model_shape_kwargs(parsed["layerwise"])
    assert kwargs["gated_linear_unit"] is True and kwargs["add_bias_linear"] is False
    assert kwargs["num_query_groups"] == 2
    layerwise_model = plan_from_args(**layerwise_cli._plan_kwargs(parsed["layerwise"])).model
    assert cli._job(parsed["plan"]).model == layerwise_model == ModelShape(**kwargs)
    assert model_shape_kwargs(parsed["trainer"]) == kwargs


def test_query_groups_count_only_with_group_query_attention():
    """Megatron-LM's meaning: --num-query-groups alone leaves multi-head attention; the flag
    alone means one group (its default 1)."""
    base = LAYERWISE_REQUIRED + LAYERWISE_REST
    args = layerwise_cli._parser().parse_args(base + ["--num-query-groups", "2"])
    assert "num_query_groups" not in model_shape_kwargs(args)
    args = layerwise_cli._parser().parse_args(base + ["--group-query-attention"])
    assert model_shape_kwargs(args)["num_query_groups"] == 1
    args = trainer.build_parser().parse_args(["--group-query-attention"])
    assert args.num_query_groups == 1


def test_trainer_defaults_are_the_demo_model():
    args = shape(trainer.build_parser().parse_args([]))
    changed = {name: value for name, value in args.items() if value != megatron_defaults()[name]}
    assert changed == dict(
        num_layers=2, hidden_size=64, num_attention_heads=8, seq_length=32, vocab_size=128,
        position_embedding_type="rope", attention_dropout=0.0, hidden_dropout=0.0,
        untie_embeddings_and_output_weights=True,
    )


@pytest.mark.parametrize("flag", LAYERWISE_REQUIRED[::2] + ["--micro-batch-size"])
def test_layerwise_planner_requires_its_shape(flag, capsys):
    argv = LAYERWISE_REQUIRED + LAYERWISE_REST
    i = argv.index(flag)
    with pytest.raises(SystemExit) as exit_:
        layerwise_cli._parser().parse_args(argv[:i] + argv[i + 2:])
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err.split("required:")[1]


def test_layerwise_planner_defaults_are_megatrons():
    args = layerwise_cli._parser().parse_args(LAYERWISE_REQUIRED + LAYERWISE_REST)
    given = {"num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length"}
    assert {name: value for name, value in shape(args).items() if name not in given} == {
        name: value for name, value in megatron_defaults().items() if name not in given}
    assert args.dtype_bytes == 2


def test_plan_keeps_the_preset_unless_a_flag_is_given():
    args = cli.build_parser().parse_args(["plan", "--preset", "moe-4l"])
    assert model_shape_kwargs(args) == {}
    assert cli._job(args).model == PRESETS["moe-4l"].job.model
    args = cli.build_parser().parse_args(
        ["plan", "--preset", "dense-4l-h4096", "--swiglu", "--num-query-groups", "8"])
    model = cli._job(args).model
    assert model.gated_linear_unit and model.num_query_groups is None  # no GQA without the flag
    args = cli.build_parser().parse_args(
        ["plan", "--preset", "dense-4l-h4096", "--group-query-attention", "--num-query-groups",
         "8", "--disable-bias-linear", "--normalization", "RMSNorm"])
    model = cli._job(args).model
    assert (model.num_query_groups, model.add_bias_linear, model.normalization) == (
        8, False, "RMSNorm")


def test_unknown_defaults_and_required_names_are_refused():
    with pytest.raises(ValueError, match="not model-shape flags: disable_bias_linear"):
        add_model_shape_args(argparse.ArgumentParser(), defaults={"disable_bias_linear": True})
    with pytest.raises(ValueError, match="not model-shape flags: micro_batch_size"):
        add_model_shape_args(argparse.ArgumentParser(), required=["micro_batch_size"])


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_trainer_help_prints_on_rank_zero_only(rank, printed, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exit_:
        trainer.build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    assert ("usage:" in capsys.readouterr().out) == printed


def _torchrun(*argv: str, tmp_path: Path, tee: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    logs = ["--log-dir", str(tmp_path), "--tee", "3"] if tee else []
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *logs, str(ROOT / "examples" / "pretrain_helix_gpt.py"), *argv],
        capture_output=True, text=True, timeout=120, env=env,
    )


def test_help_prints_once_under_torchrun(tmp_path):
    proc = _torchrun("--help", tmp_path=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert output.count("usage: pretrain_helix_gpt.py") == 1, output[-3000:]


def test_a_bad_flag_still_errors_on_every_rank(tmp_path):
    proc = _torchrun("--no-such-flag", tmp_path=tmp_path, tee=True)
    assert proc.returncode != 0
    for rank in range(2):
        rank_log = "".join(p.read_text() for p in tmp_path.rglob(f"{rank}/stderr.log"))
        assert "unrecognized arguments: --no-such-flag" in rank_log, proc.stderr[-3000:]

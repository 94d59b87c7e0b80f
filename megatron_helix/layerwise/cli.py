"""The command line behind ``python -m megatron_helix.layerwise``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from megatron_helix.layerwise.budgets import BUDGET_KINDS, NAMED_BUDGETS
from megatron_helix.layerwise.partition import COST_METRICS, plan_from_args
from megatron_helix.layerwise.plan import LayerwisePlanError
from megatron_helix.layerwise.report import format_plan
from megatron_helix.layerwise.workload import MODES
from megatron_helix.model_args import add_model_shape_args, model_shape_kwargs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_helix.layerwise",
        description="Cut a GPT decoder stack into pipeline stages that fit a per-device budget.",
    )
    size = add_model_shape_args(parser, "model (Megatron-LM names)", required=(
        "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length"))
    size.add_argument("--micro-batch-size", type=int, required=True)
    size.add_argument("--dtype-bytes", type=int, default=2, help="2 for fp16/bf16, 4 for fp32")
    plan = parser.add_argument_group("plan")
    plan.add_argument("--mode", choices=MODES, required=True)
    plan.add_argument("--budget", required=True,
                      help=f"'50MB', '50MiB', '80GB', bytes, or one of {sorted(NAMED_BUDGETS)}")
    plan.add_argument("--budget-kind", choices=BUDGET_KINDS, default="cache",
                      help="what a size budget bounds: a cache (what one step touches) or "
                           "memory (what the stage keeps); named budgets know theirs")
    plan.add_argument("--cost", choices=COST_METRICS)
    layout = plan.add_mutually_exclusive_group(required=True)
    layout.add_argument("--pipeline-model-parallel-size", type=int)
    layout.add_argument("--world-size", type=int)
    plan.add_argument("--tensor-model-parallel-size", type=int, default=1)
    return parser


# plan_from_args' arguments besides the model shape, passed as parsed.
_PLAN_ARGS = ("seq_length", "micro_batch_size", "dtype_bytes", "mode", "budget", "budget_kind",
              "cost", "pipeline_model_parallel_size", "world_size", "tensor_model_parallel_size")


def _plan_kwargs(args: argparse.Namespace) -> dict:
    """``plan_from_args``' keywords: the model shape in ``ModelShape``'s names, then the rest."""
    return dict(model_shape_kwargs(args), **{name: getattr(args, name) for name in _PLAN_ARGS})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the plan; exit status 1 (with the closest plan and the reasons) when nothing fits."""
    kwargs = _plan_kwargs(_parser().parse_args(argv))
    try:
        print(format_plan(plan_from_args(**kwargs)))
        return 0
    except LayerwisePlanError as error:
        print(format_plan(error.plan))
        print(f"REFUSED: {error}")
        return 1

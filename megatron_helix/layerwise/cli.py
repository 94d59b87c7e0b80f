"""The command line behind ``python -m megatron_helix.layerwise``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from megatron_helix.layerwise.budgets import BUDGET_KINDS, NAMED_BUDGETS
from megatron_helix.layerwise.partition import COST_METRICS, plan_from_args
from megatron_helix.layerwise.plan import LayerwisePlanError
from megatron_helix.layerwise.report import format_plan
from megatron_helix.layerwise.working_set import MODES, NORMALIZATIONS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_helix.layerwise",
        description="Cut a GPT decoder stack into pipeline stages that fit a per-device budget.",
    )
    size = parser.add_argument_group("model (Megatron-LM names)")
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size",
                 "--seq-length", "--micro-batch-size"):
        size.add_argument(flag, type=int, required=True)
    for flag in ("--num-query-groups", "--kv-channels", "--num-experts", "--vocab-size"):
        size.add_argument(flag, type=int)
    size.add_argument("--moe-router-topk", type=int, default=2)
    size.add_argument("--swiglu", dest="gated_linear_unit", action="store_true")
    size.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    size.add_argument("--normalization", choices=NORMALIZATIONS, default="LayerNorm")
    size.add_argument("--untie-embeddings-and-output-weights", action="store_true")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the plan; exit status 1 (with the closest plan and the reasons) when nothing fits."""
    args = vars(_parser().parse_args(argv))
    try:
        print(format_plan(plan_from_args(**args)))
        return 0
    except LayerwisePlanError as error:
        print(format_plan(error.plan))
        print(f"REFUSED: {error}")
        return 1

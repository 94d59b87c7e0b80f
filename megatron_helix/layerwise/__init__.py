"""Layer-wise cache-aware partitioning: cut the decoder stack into stages that fit a budget.

Each pipeline stage runs on its own device (or on a tensor / helix group of ``t`` devices); the
planner chooses how many consecutive decoder layers each stage holds so that

1. every stage's working set fits a per-device budget (an L2 cache, shared memory or HBM), and
2. the slowest stage -- the largest per-stage cost, in FLOPs or in bytes -- is as small as possible.

The cut is exact: a dynamic program over contiguous partitions minimises the bottleneck (see
``_StageModel.partition``), so it is never worse than Megatron's even split when that fits.
When nothing fits, ``LayerwisePlanError`` states the layer's bytes, the budget, the budget this
layout would need and the smallest tensor (or helix) split that would fit.

Modules:

- ``budgets``: named device budgets, ``parse_budget`` and byte formatting.
- ``model_shape``: ``ModelShape``, a decoder stack and its parameters per rank.
- ``workload``: ``Workload`` (what a stage runs) and ``StageWorkingSet`` (what it needs).
- ``stage_model``: one stage's working set and cost, and the exact partition DP. KV caches and
  activations are priced by ``megatron_helix.perf.memory``, the project's one activation-memory
  model, which ``megatron-helix plan`` uses as well.
- ``plan``: ``StagePlan`` and its Megatron layout string / kwargs / flags, ``split_layout``,
  ``LayerwisePlanError``.
- ``partition``: ``plan_layerwise``, ``evaluate_layout``, ``even_cut``, ``plan_for_world``,
  ``plan_from_args``.
- ``refusal``: the ``LayerwisePlanError`` that says why nothing fits.
- ``report``: ``format_plan``.
- ``cli``: ``python -m megatron_helix.layerwise``.
- ``problems``: argument checks that list every problem in one ``ValueError``.
"""

from megatron_helix.layerwise.budgets import (
    BUDGET_KINDS,
    NAMED_BUDGETS,
    Budget,
    format_bytes,
    parse_budget,
)
from megatron_helix.layerwise.cli import main
from megatron_helix.layerwise.model_shape import NORMALIZATIONS, ModelShape
from megatron_helix.layerwise.partition import (
    COST_METRICS,
    evaluate_layout,
    even_cut,
    plan_for_world,
    plan_from_args,
    plan_layerwise,
)
from megatron_helix.layerwise.plan import LayerwisePlanError, Stage, StagePlan, split_layout
from megatron_helix.layerwise.refusal import MAX_TENSOR_SPLIT
from megatron_helix.layerwise.report import format_plan
from megatron_helix.layerwise.workload import MODES, StageWorkingSet, Workload

__all__ = [
    "BUDGET_KINDS",
    "COST_METRICS",
    "MAX_TENSOR_SPLIT",
    "MODES",
    "NAMED_BUDGETS",
    "NORMALIZATIONS",
    "Budget",
    "LayerwisePlanError",
    "ModelShape",
    "Stage",
    "StagePlan",
    "StageWorkingSet",
    "Workload",
    "evaluate_layout",
    "even_cut",
    "format_bytes",
    "format_plan",
    "main",
    "parse_budget",
    "plan_for_world",
    "plan_from_args",
    "plan_layerwise",
    "split_layout",
]

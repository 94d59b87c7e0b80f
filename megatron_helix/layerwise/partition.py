"""The planner's entry points: the best fitting cut, a given cut, the even split, a world size."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

from megatron_helix.layerwise.budgets import Budget, format_bytes, parse_budget
from megatron_helix.layerwise.model_shape import ModelShape
from megatron_helix.layerwise.plan import (
    LayerwisePlanError,
    StagePlan,
    _is_legal_split,
    split_layout,
)
from megatron_helix.layerwise.refusal import _refusal
from megatron_helix.layerwise.stage_model import _StageModel
from megatron_helix.layerwise.workload import Workload

COST_METRICS = ("flops", "bytes")


def _stage_model(model, workload, num_stages, budget, tensor_split, cost) -> _StageModel:
    cost = cost or workload.default_cost
    if cost not in COST_METRICS:
        raise ValueError(f"cost {cost!r} is not one of {COST_METRICS}")
    if not 1 <= num_stages <= model.num_layers + (2 if num_stages > 1 else 0):
        raise ValueError(
            f"{num_stages} pipeline stages cannot hold {model.num_layers} decoder layers: middle "
            f"stages need at least one (at most {model.num_layers + 2} stages)"
        )
    split_layout(model, tensor_split)
    return _StageModel(model, workload, parse_budget(budget), tensor_split, num_stages, cost)


def plan_layerwise(
    model: ModelShape,
    workload: Workload,
    num_stages: int,
    budget: Union[Budget, str, int],
    tensor_split: int = 1,
    cost: Optional[str] = None,
) -> StagePlan:
    """The contiguous cut into ``num_stages`` stages that fits ``budget`` with the smallest
    bottleneck (largest per-stage ``cost``: ``"flops"`` or ``"bytes"``, by default chosen from
    the mode); among equal bottlenecks, the one whose bottleneck stage needs fewer bytes.

    Raises ``LayerwisePlanError`` when no cut fits.
    """
    stage_model = _stage_model(model, workload, num_stages, budget, tensor_split, cost)
    counts = stage_model.partition(stage_model.fits_key)
    if counts is None:
        raise _refusal(stage_model)
    return stage_model.plan(counts)


def evaluate_layout(
    model: ModelShape,
    workload: Workload,
    layer_counts: Sequence[int],
    budget: Union[Budget, str, int],
    tensor_split: int = 1,
    cost: Optional[str] = None,
) -> StagePlan:
    """The plan for a given cut (decoder layers per stage), fitting or not: how an existing
    layout fares against a budget."""
    stage_model = _stage_model(model, workload, len(layer_counts), budget, tensor_split, cost)
    return stage_model.plan(layer_counts)


def even_cut(num_layers: int, num_stages: int) -> List[int]:
    """Megatron's default cut: ``num_layers / num_stages`` decoder layers per stage (must
    divide); ``evaluate_layout`` says how it fares."""
    if num_layers % num_stages:
        raise ValueError(
            f"Megatron's even split needs num_layers {num_layers} divisible by "
            f"{num_stages} stages"
        )
    return [num_layers // num_stages] * num_stages


def plan_for_world(
    model: ModelShape,
    workload: Workload,
    world_size: int,
    budget: Union[Budget, str, int],
    cost: Optional[str] = None,
) -> StagePlan:
    """Use ``world_size`` devices as ``pipeline x tensor split``, smallest split that fits first.

    A smaller split means less intra-layer communication; pipelining is tried as deep as the
    layer count allows before layers are split.
    """
    attempts: List[Tuple[int, LayerwisePlanError]] = []
    for split in range(1, world_size + 1):
        stages = world_size // split
        if world_size % split or stages > model.num_layers + 2 or not _is_legal_split(model, split):
            continue
        try:
            return plan_layerwise(model, workload, stages, budget, split, cost)
        except LayerwisePlanError as error:
            attempts.append((split, error))
    if not attempts:
        raise ValueError(f"no pipeline x tensor layout of {world_size} devices suits this model")
    lines = [
        f"no layout of {world_size} devices fits {parse_budget(budget)} in {workload.mode!r} mode:"
    ]
    for split, error in attempts:
        nearest = (f"fits with tensor split {error.min_tensor_split} "
                   f"({error.plan.num_stages * error.min_tensor_split} devices)"
                   if error.min_tensor_split else "no split fits")
        lines.append(
            f"  - pipeline {error.plan.num_stages} x tensor split {split}: needs "
            f"{format_bytes(error.needed_budget)} per device; {nearest}"
        )
    closest = min((error for _, error in attempts), key=lambda error: error.needed_budget)
    raise LayerwisePlanError("\n".join(lines), closest.plan, closest.needed_budget,
                             closest.min_tensor_split)


def plan_from_args(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: int,
    seq_length: int,
    micro_batch_size: int,
    budget: Union[Budget, str, int],
    budget_kind: str = "cache",
    pipeline_model_parallel_size: Optional[int] = None,
    tensor_model_parallel_size: int = 1,
    world_size: Optional[int] = None,
    mode: str = "training",
    num_query_groups: Optional[int] = None,
    kv_channels: Optional[int] = None,
    num_experts: Optional[int] = None,
    moe_router_topk: int = 2,
    vocab_size: Optional[int] = None,
    gated_linear_unit: bool = False,
    add_bias_linear: bool = True,
    normalization: str = "LayerNorm",
    untie_embeddings_and_output_weights: bool = False,
    dtype_bytes: int = 2,
    cost: Optional[str] = None,
) -> StagePlan:
    """The planner behind ``--helix-layerwise --helix-cache-budget 50MB``, in Megatron's names.

    Give ``pipeline_model_parallel_size`` (with ``tensor_model_parallel_size``) to fix the
    layout, or ``world_size`` to let the planner pick the smallest tensor split that fits.
    ``budget`` is a ``Budget``, a byte count or a string for ``parse_budget``; ``budget_kind``
    (``"cache"`` or ``"memory"``) applies to sizes, named budgets know theirs. Returns the plan;
    ``plan.transformer_config_kwargs`` go into ``TransformerConfig``. Raises
    ``LayerwisePlanError`` when nothing fits.
    """
    if (pipeline_model_parallel_size is None) == (world_size is None):
        raise ValueError("give exactly one of pipeline_model_parallel_size and world_size")
    model = ModelShape(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size, num_query_groups=num_query_groups,
        kv_channels=kv_channels, num_experts=num_experts, moe_router_topk=moe_router_topk,
        vocab_size=vocab_size, gated_linear_unit=gated_linear_unit,
        add_bias_linear=add_bias_linear, normalization=normalization,
        untie_embeddings_and_output_weights=untie_embeddings_and_output_weights,
    )
    workload = Workload(mode, micro_batch_size, seq_length, dtype_bytes)
    budget = parse_budget(budget, budget_kind)
    if world_size is not None:
        return plan_for_world(model, workload, world_size, budget, cost)
    return plan_layerwise(model, workload, pipeline_model_parallel_size, budget,
                          tensor_model_parallel_size, cost)

"""Why no cut fits: the closest plan, the budget it needs and the smallest split that fits."""

from __future__ import annotations

import math
from typing import Optional

from megatron_helix.layerwise.budgets import NAMED_BUDGETS, format_bytes
from megatron_helix.layerwise.plan import LayerwisePlanError, _is_legal_split, split_layout
from megatron_helix.layerwise.stage_model import _StageModel

MAX_TENSOR_SPLIT = 4096


def _fits_anywhere(stage_model: _StageModel) -> bool:
    feasible = stage_model.partition(lambda i, n: (0,) if stage_model.fits_key(i, n) else None)
    return feasible is not None


def _smallest_fitting_split(stage_model: _StageModel) -> Optional[int]:
    """Binary search over legal splits: every working-set term shrinks as the split grows."""
    candidates = [
        split for split in range(stage_model.tensor_split + 1, MAX_TENSOR_SPLIT + 1)
        if _is_legal_split(stage_model.model, split)
    ]
    low, high, found = 0, len(candidates) - 1, None
    while low <= high:
        middle = (low + high) // 2
        probe = _StageModel(stage_model.model, stage_model.workload, stage_model.budget,
                            candidates[middle], stage_model.num_stages, stage_model.cost_metric)
        if _fits_anywhere(probe):
            found, high = candidates[middle], middle - 1
        else:
            low = middle + 1
    return found


def _refusal(stage_model: _StageModel) -> LayerwisePlanError:
    model, budget, split = stage_model.model, stage_model.budget, stage_model.tensor_split
    dtype = stage_model.workload.dtype_bytes
    closest = stage_model.plan(stage_model.partition(stage_model.bytes_key))
    needed = closest.max_bytes
    worst = max(closest.stages, key=lambda stage: stage.working_set.total)
    layer_bytes = model.layer_params(split) * dtype
    min_split = _smallest_fitting_split(stage_model)
    unique_params = model.num_layers * model.layer_params() + model.output_params() + (
        model.embedding_params() if model.untie_embeddings_and_output_weights else 0)
    model_weights = unique_params * dtype
    holders = [
        name for name, named in NAMED_BUDGETS.items()
        if named.kind == budget.kind and named.bytes >= needed
    ]
    lines = [
        f"no cut of {model.num_layers} decoder layers into {stage_model.num_stages} pipeline "
        f"stages at tensor split {split} fits {budget} per device "
        f"({stage_model.workload.mode!r} mode).",
        f"  - one decoder layer holds {format_bytes(layer_bytes)} of weights at tensor split "
        f"{split} ({layer_bytes / budget.bytes:.2f}x the budget)",
        f"  - the closest cut {closest.layer_counts} needs {format_bytes(needed)} "
        f"({needed:,} B) per device, at stage {worst.index}; a budget that large would fit"
        + (f" (e.g. {', '.join(holders)})" if holders else ""),
    ]
    if min_split:
        layout = split_layout(model, min_split)
        how = f"helix m={layout[0]} x n={layout[1]}" if layout else f"TP={min_split}"
        lines.append(
            f"  - smallest tensor split that fits {stage_model.num_stages} stages: {min_split} "
            f"({how}), i.e. {stage_model.num_stages * min_split} devices"
        )
    else:
        lines.append(f"  - no tensor split up to {MAX_TENSOR_SPLIT} fits "
                     f"{stage_model.num_stages} stages")
    lines.append(
        f"  - the weights alone ({format_bytes(model_weights)} unsplit) need at least "
        f"{math.ceil(model_weights / budget.bytes)} devices of this budget"
    )
    return LayerwisePlanError("\n".join(lines), closest, needed, min_split)

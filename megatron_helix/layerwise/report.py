"""A plan as a readable table, with Megatron's even split and flags."""

from __future__ import annotations

import shlex

from megatron_helix.layerwise.budgets import format_bytes
from megatron_helix.layerwise.partition import evaluate_layout, even_cut
from megatron_helix.layerwise.plan import StagePlan


def _format_cost(plan: StagePlan, cost: int) -> str:
    if plan.cost_metric == "bytes":
        return format_bytes(cost)
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if cost >= scale:
            return f"{cost / scale:.2f} {unit}"
    return f"{cost} FLOP"


def format_plan(plan: StagePlan) -> str:
    """A readable table of the plan, with Megatron's even split for comparison when it exists."""
    m, w = plan.model, plan.workload
    split = f"helix {plan.helix[0]}x{plan.helix[1]}" if plan.helix else f"TP {plan.tensor_split}"
    state_label = {"decode": "kv cache", "training": "grad+optim"}.get(w.mode, "state")
    lines = [
        f"layer-wise plan: {m.num_layers} decoder layers -> {plan.num_stages} stages x {split} "
        f"({plan.world_size} devices), mode {w.mode}, {w.dtype_bytes} B/element, "
        f"micro-batch {w.micro_batch_size} x seq {w.seq_length}",
        f"budget {plan.budget}; balanced by {plan.cost_metric}",
        f"{'stage':>5}  {'layers':<14}{'weights':>10}{state_label:>11}{'activations':>13}"
        f"{'total':>11}  {'fits':<5}{'cost':>16}",
    ]
    for stage in plan.stages:
        span = (f"{stage.first_layer}-{stage.layers[-1]}" if stage.num_layers > 1
                else str(stage.first_layer) if stage.num_layers else "")
        ends = ["E"] * (stage.index == 0) + [span] * bool(span) + ["L"] * (
            stage.index == plan.num_stages - 1)
        ws = stage.working_set
        lines.append(
            f"{stage.index:>5}  {'+'.join(ends):<14}{format_bytes(ws.weight_bytes):>10}"
            f"{format_bytes(ws.state_bytes):>11}{format_bytes(ws.activation_bytes):>13}"
            f"{format_bytes(ws.total):>11}  {'yes' if stage.fits else 'NO':<5}"
            f"{_format_cost(plan, stage.cost):>16}"
        )
    lines.append(f"bottleneck: {_format_cost(plan, plan.max_cost)} per step; largest working set "
                 f"{format_bytes(plan.max_bytes)}; fits: {'yes' if plan.fits else 'NO'}")
    if m.num_layers % plan.num_stages == 0:
        even = evaluate_layout(m, w, even_cut(m.num_layers, plan.num_stages), plan.budget,
                               plan.tensor_split, plan.cost_metric)
        lines.append(f"Megatron even split {even.layer_counts[0]} x {plan.num_stages}: bottleneck "
                     f"{_format_cost(even, even.max_cost)}, largest working set "
                     f"{format_bytes(even.max_bytes)}, fits: {'yes' if even.fits else 'NO'}")
    kwargs = ", ".join(f"{key}={value!r}" for key, value in plan.transformer_config_kwargs.items())
    lines.append(f"TransformerConfig({kwargs})")
    lines.append(f"Megatron-LM flags: {shlex.join(plan.megatron_args)}")
    return "\n".join(lines)

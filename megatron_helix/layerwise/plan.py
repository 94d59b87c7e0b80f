"""A stage plan and how Megatron runs it: layout string, ``TransformerConfig`` kwargs, flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megatron_helix.layerwise.budgets import Budget
from megatron_helix.layerwise.model_shape import ModelShape
from megatron_helix.layerwise.problems import raise_problems
from megatron_helix.layerwise.workload import StageWorkingSet, Workload
from megatron_helix.layout import layout_errors


class LayerwisePlanError(ValueError):
    """No partition fits the budget.

    Attributes:
        plan: the partition that comes closest (smallest largest-stage working set).
        needed_budget: bytes per device that partition needs.
        min_tensor_split: the smallest legal tensor / helix split at which the same number of
            stages fits, or None when none up to ``MAX_TENSOR_SPLIT`` does.
    """

    def __init__(
        self, message: str, plan: "StagePlan", needed_budget: int, min_tensor_split: Optional[int]
    ):
        super().__init__(message)
        self.plan = plan
        self.needed_budget = needed_budget
        self.min_tensor_split = min_tensor_split


@dataclass(frozen=True)
class Stage:
    """Decoder layers ``[first_layer, first_layer + num_layers)`` on one pipeline rank.

    Stage 0 also holds the embedding, the last stage the final norm and output layer.
    """

    index: int
    first_layer: int
    num_layers: int
    working_set: StageWorkingSet
    cost: int
    fits: bool

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


@dataclass(frozen=True)
class StagePlan:
    """Contiguous stages covering every decoder layer once, with Megatron's way to run them.

    ``helix`` is ``(m, n)`` when the tensor split needs a helix layout (``m > 1``), else None
    (plain tensor parallelism). Validates its own invariants.
    """

    model: ModelShape
    workload: Workload
    budget: Budget
    tensor_split: int
    cost_metric: str
    stages: Tuple[Stage, ...]
    helix: Optional[Tuple[int, int]] = None

    def __post_init__(self) -> None:
        problems, expected_first = [], 0
        for position, stage in enumerate(self.stages):
            if stage.index != position or stage.first_layer != expected_first:
                problems.append(f"stage {position} is out of order or not contiguous: {stage}")
            if stage.num_layers < 0 or (
                stage.num_layers == 0 and 0 < position < len(self.stages) - 1
            ):
                problems.append(f"middle stage {position} holds no decoder layer")
            if stage.fits != (stage.working_set.total <= self.budget.bytes):
                problems.append(f"stage {position} fits flag disagrees with the budget")
            expected_first += stage.num_layers
        if not self.stages or expected_first != self.model.num_layers:
            problems.append(
                f"stages hold {expected_first} decoder layers, the model {self.model.num_layers}"
            )
        raise_problems("stage plan", problems)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def world_size(self) -> int:
        """Devices the plan occupies (one data-parallel replica)."""
        return self.num_stages * self.tensor_split

    @property
    def layer_counts(self) -> List[int]:
        return [stage.num_layers for stage in self.stages]

    @property
    def fits(self) -> bool:
        return all(stage.fits for stage in self.stages)

    @property
    def max_cost(self) -> int:
        return max(stage.cost for stage in self.stages)

    @property
    def max_bytes(self) -> int:
        return max(stage.working_set.total for stage in self.stages)

    @property
    def pipeline_layout(self) -> str:
        """megatron-core's ``pipeline_model_parallel_layout`` string, e.g. ``"Et*3|t*4|t*5L"``."""
        stages = []
        for stage in self.stages:
            layers = {0: "", 1: "t"}.get(stage.num_layers, f"t*{stage.num_layers}")
            stages.append(
                ("E" if stage.index == 0 else "") + layers
                + ("L" if stage.index == self.num_stages - 1 else "")
            )
        return "|".join(stages)

    @property
    def transformer_config_kwargs(self) -> Dict[str, object]:
        """Keyword arguments for megatron-core 0.16.1's ``TransformerConfig``.

        The trainer adds the rest (``num_layers`` must equal the layout's decoder count and
        ``pipeline_dtype`` is required whenever the pipeline has more than one stage).
        """
        kwargs: Dict[str, object] = {
            "tensor_model_parallel_size": self.tensor_split,
            "pipeline_model_parallel_size": self.num_stages,
        }
        if self.num_stages > 1:
            kwargs["pipeline_model_parallel_layout"] = self.pipeline_layout
        return kwargs

    @property
    def first_last_kwargs(self) -> Optional[Dict[str, int]]:
        """The same cut as ``num_layers_in_{first,last}_pipeline_stage``, when that can say it.

        Megatron's older uneven-pipeline knobs need non-empty end stages and equal middles.
        """
        counts = self.layer_counts
        if self.num_stages < 2 or 0 in counts or len(set(counts[1:-1])) > 1:
            return None
        return {
            "num_layers_in_first_pipeline_stage": counts[0],
            "num_layers_in_last_pipeline_stage": counts[-1],
        }

    @property
    def megatron_args(self) -> List[str]:
        """Megatron-LM command-line arguments (``pretrain_gpt.py``) for this plan."""
        args = ["--tensor-model-parallel-size", str(self.tensor_split),
                "--pipeline-model-parallel-size", str(self.num_stages)]
        if self.num_stages > 1:
            args += ["--pipeline-model-parallel-layout", self.pipeline_layout]
        if self.helix:
            args += ["--helix-m", str(self.helix[0]), "--helix-n", str(self.helix[1])]
        return args


def split_layout(model: ModelShape, tensor_split: int) -> Optional[Tuple[int, int]]:
    """How ``tensor_split`` ranks can share each layer: None for plain TP, else helix ``(m, n)``.

    Plain tensor parallelism needs the split to divide the heads and KV groups. Otherwise a
    helix layout ``m * n`` with ``n`` dividing the KV groups (as many head groups as possible,
    keeping slice traffic small) and ``m`` slicing the head dim (rotate-half RoPE) may work.
    Raises ValueError when neither does.
    """
    heads, groups = model.num_attention_heads, model.query_groups
    if tensor_split < 1:
        raise ValueError(f"tensor split must be >= 1, got {tensor_split}")
    if heads % tensor_split == 0 and groups % tensor_split == 0:
        return None
    for n in sorted((n for n in range(1, groups + 1) if groups % n == 0), reverse=True):
        m = tensor_split // n
        if tensor_split % n == 0 and not layout_errors(m, n, heads, groups, model.head_dim):
            return (m, n)
    raise ValueError(
        f"tensor split {tensor_split} fits neither tensor parallelism ({heads} heads, {groups} "
        f"KV groups) nor a helix m x n layout (head dim {model.head_dim})"
    )


def _is_legal_split(model: ModelShape, tensor_split: int) -> bool:
    try:
        split_layout(model, tensor_split)
    except ValueError:
        return False
    return True

"""A parallel layout as the cost model and the memory formulas see it, and every legal one.

A layout is Megatron's ``TP x PP x CP x DP`` where the tensor-parallel group may be a helix
``m x n`` group (``m > 1`` dim slices, ``n = TP / m`` head groups) and the context-parallel
group is the plugin's ring. Legality is the plugin's own (``parallel_dims.size_errors`` and
``model_errors``: world size, ``layout_errors``, zigzag lengths) plus what Megatron adds: whole layers per pipeline
stage, whole micro-batches per data-parallel rank, sequence parallelism for MoE with TP, and a
ring over helix slices needs whole heads per slice (``helix_ring_core_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List

from megatron_helix.layerwise import ModelShape
from megatron_helix.parallel_dims import model_errors, size_errors

SCORE_STRATEGIES = ("allreduce", "redistribute")


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of one layout; ``tp`` is Megatron's tensor-parallel size (``m * n`` under helix).

    ``score_strategy`` is the resolved helix strategy (meaningless when ``helix_m == 1``);
    ``layerwise`` marks the seed's one-layer-per-stage pipeline (a labelled ``PP``).
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    helix_m: int = 1
    sequence_parallel: bool = False
    score_strategy: str = "redistribute"
    layerwise: bool = False

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("tp", "pp", "cp", "dp", "helix_m") if getattr(self, name) < 1]
        if not problems and self.tp % self.helix_m:
            problems.append(
                f"helix m {self.helix_m} must divide the tensor-parallel size {self.tp}")
        if self.score_strategy not in SCORE_STRATEGIES:
            problems.append(f"score_strategy {self.score_strategy!r} not in {SCORE_STRATEGIES}")
        if self.sequence_parallel and self.tp == 1:
            problems.append("sequence parallelism needs tensor parallelism (tp > 1)")
        if problems:
            raise ValueError("invalid layout:\n  - " + "\n  - ".join(problems))

    @property
    def helix_n(self) -> int:
        return self.tp // self.helix_m

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def is_helix(self) -> bool:
        return self.helix_m > 1

    @property
    def label(self) -> str:
        """``TP=8 x PP=2``, ``helix 4x4 redistribute``, ``ring R=16``, ``layer-wise PP=16``...
        (under a ring, helix trades slices for whole heads: no score strategy)"""
        parts = []
        if self.is_helix:
            strategy = f" {self.score_strategy}" if self.cp == 1 else ""
            parts.append(f"helix {self.helix_m}x{self.helix_n}{strategy}")
        elif self.tp > 1:
            parts.append(f"TP={self.tp}" + ("+SP" if self.sequence_parallel else ""))
        if self.cp > 1:
            parts.append(f"ring R={self.cp}")
        if self.pp > 1:
            parts.append(("layer-wise PP=" if self.layerwise else "PP=") + str(self.pp))
        if self.dp > 1:
            parts.append(f"DP={self.dp}")
        return " x ".join(parts) or "1 device"

    def errors(self, model: ModelShape, seq_length: int, global_batch: int,
               micro_batch: int) -> List[str]:
        """Every reason this layout cannot run ``model`` (empty when it can)."""
        problems = size_errors(
            self.world_size, self.helix_m, self.helix_n, self.cp, self.pp
        ) + model_errors(
            self.helix_m, self.helix_n, self.cp, num_heads=model.num_attention_heads,
            num_query_groups=model.query_groups, head_dim=model.head_dim, seq_length=seq_length,
        )
        if model.num_layers % self.pp:
            problems.append(f"{model.num_layers} layers do not split evenly into {self.pp} stages")
        if global_batch % (micro_batch * self.dp):
            problems.append(f"global batch {global_batch} is not a multiple of micro-batch "
                            f"{micro_batch} x DP {self.dp}")
        if model.num_experts and self.tp > 1 and not self.sequence_parallel:
            problems.append("MoE with tensor parallelism needs sequence parallelism (Megatron)")
        if self.is_helix and self.cp > 1:
            heads = model.num_attention_heads // self.helix_n
            groups = model.query_groups // self.helix_n
            if heads % self.helix_m or groups % self.helix_m:
                problems.append("a ring over helix slices needs whole heads per slice")
        return problems


def standard_layout(model: ModelShape, tp: int = 1, pp: int = 1, cp: int = 1, dp: int = 1,
                    helix_m: int = 1, score_strategy: str = "redistribute") -> ParallelLayout:
    """A layout as the planner runs it: sequence parallelism whenever TP > 1 (Megatron's
    recommended setting; MoE needs it), and ``layerwise`` for the seeds' one layer per device
    (pipeline stages = layers = devices)."""
    world = tp * pp * cp * dp
    return ParallelLayout(tp=tp, pp=pp, cp=cp, dp=dp, helix_m=helix_m, sequence_parallel=tp > 1,
                          score_strategy=score_strategy,
                          layerwise=pp == model.num_layers == world and pp > 1)


def candidate_layouts(model: ModelShape, world_size: int, seq_length: int, global_batch: int,
                      micro_batch: int) -> Iterator[ParallelLayout]:
    """Every legal ``standard_layout`` of ``world_size`` ranks: TP or helix (each score
    strategy) x PP x ring x DP."""
    divisors = [k for k in range(1, world_size + 1) if world_size % k == 0]
    for tp in divisors:
        for pp in divisors:
            for cp in divisors:
                if world_size % (tp * pp * cp):
                    continue
                dp = world_size // (tp * pp * cp)
                for m in (k for k in divisors if tp % k == 0):
                    # the score strategy matters only without a ring (which attends whole heads)
                    strategies = SCORE_STRATEGIES if m > 1 and cp == 1 else ("redistribute",)
                    for strategy in strategies:
                        layout = standard_layout(model, tp=tp, pp=pp, cp=cp, dp=dp, helix_m=m,
                                                 score_strategy=strategy)
                        if not layout.errors(model, seq_length, global_batch, micro_batch):
                            yield layout

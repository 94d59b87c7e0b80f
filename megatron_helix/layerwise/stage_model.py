"""One stage's working set and cost (bytes, FLOPs) and the exact DP over contiguous cuts.

Weights are counted here (a cache budget counts the embedding rows a step reads, a memory
budget the whole table); KV caches and activations are priced by ``perf.memory``, the one
activation-memory model, for ``layout``: the planner's stages as ``perf`` sees a layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

from megatron_helix.attention.strategy import SliceGroupShape, choose_strategy
from megatron_helix.layerwise.budgets import Budget
from megatron_helix.layerwise.model_shape import ModelShape, ceil_div
from megatron_helix.layerwise.plan import Stage, StagePlan, split_layout
from megatron_helix.layerwise.workload import StageWorkingSet, Workload

if TYPE_CHECKING:
    from megatron_helix.perf.layouts import ParallelLayout


@dataclass(frozen=True)
class _StageModel:
    """Working set and cost of a stage holding ``n`` decoder layers at position ``index``."""

    model: ModelShape
    workload: Workload
    budget: Budget
    tensor_split: int
    num_stages: int
    cost_metric: str

    @cached_property
    def layout(self) -> "ParallelLayout":
        """The plan as ``perf.memory`` prices it: ``num_stages`` pipeline stages of
        ``tensor_split`` ranks, plain TP or helix ``m x n`` (``split_layout``) with the score
        strategy Megatron's ``auto`` picks for a training step, sequence parallel when split,
        no ring, no data parallelism."""
        # perf.layouts imports this package (for ModelShape): import it when first used.
        from megatron_helix.perf.layouts import ParallelLayout

        t, w = self.tensor_split, self.workload
        m = (split_layout(self.model, t) or (1, t))[0]
        strategy = "redistribute"
        if m > 1:
            n, b, s = t // m, w.micro_batch_size, w.seq_length
            shape = SliceGroupShape(m, b, s, s, self.model.num_attention_heads // n,
                                    self.model.query_groups // n, self.model.head_dim // m,
                                    w.dtype_bytes)
            strategy = choose_strategy("auto", shape, backward=True, causal=True)
        return ParallelLayout(tp=t, pp=self.num_stages, helix_m=m, sequence_parallel=t > 1,
                              score_strategy=strategy)

    def parameters(self, index: int, num_layers: int) -> int:
        """Parameters one device of the stage holds: its layers, the output layer (with the
        final norm) on the last stage, the embedding on the first unless tied to an output
        layer on the same stage. A cache budget leaves the embedding to ``weight_bytes``."""
        m, t = self.model, self.tensor_split
        params = num_layers * m.layer_params(t)
        if index == self.num_stages - 1:
            params += m.output_params(t)
        if self._holds_embedding(index) and self.budget.kind == "memory":
            params += m.embedding_params(t)
        return params

    def _holds_embedding(self, index: int) -> bool:
        last = index == self.num_stages - 1
        return (index == 0 and bool(self.model.vocab_size)
                and (self.model.untie_embeddings_and_output_weights or not last))

    def weight_bytes(self, index: int, num_layers: int) -> int:
        """The parameters' bytes, plus under a cache budget the embedding rows one step reads
        (``min(T, V' / t)`` rows of ``D``)."""
        m, w, t = self.model, self.workload, self.tensor_split
        rows = 0
        if self._holds_embedding(index) and self.budget.kind == "cache":
            rows = min(w.tokens, m.padded_vocab(t) // t) * m.hidden_size
        return (self.parameters(index, num_layers) + rows) * w.dtype_bytes

    def working_set(self, index: int, num_layers: int) -> StageWorkingSet:
        """Weights, state (KV cache decoding; gradients and optimizer state training) and
        activations (live in inference; saved for backward in training, ``num_stages - index``
        micro-batches in flight under 1F1B) of one device of the stage."""
        # perf.memory imports this package (for ModelShape): import it when first used.
        from megatron_helix.perf import memory

        m, w, layout = self.model, self.workload, self.layout
        last, e = index == self.num_stages - 1, w.dtype_bytes
        weights = self.weight_bytes(index, num_layers)
        if w.mode == "training":
            state = self.parameters(index, num_layers) * w.training_state_bytes_per_param
            activations = memory.stage_activation_bytes(
                m, layout, index, w.micro_batch_size, w.seq_length, self.num_stages, e,
                layers=num_layers)
            return StageWorkingSet(weights, state, activations)
        if w.mode == "weights":
            return StageWorkingSet(weights, 0, 0)
        cache = 0
        if w.mode == "decode":
            cache = memory.kv_cache_bytes(m, layout, w.micro_batch_size, w.seq_length, e,
                                          layers=num_layers)
        live = memory.live_activation_bytes(m, layout, w.tokens, e, num_layers, last)
        return StageWorkingSet(weights, cache, live)

    def flops(self, index: int, num_layers: int) -> int:
        """Forward FLOPs (x3 for training) of one micro-batch step on one device of the stage."""
        m, w, t = self.model, self.workload, self.tensor_split
        heads_dims = m.num_attention_heads * m.head_dim
        b, s = w.micro_batch_size, w.seq_length
        attention = {
            "weights": 0,
            "decode": 4 * b * s * heads_dims,  # q.k and p.v against s cached tokens
            "forward": 2 * b * s * (s + 1) * heads_dims,  # causal: (s + 1) / 2 keys per query
            "training": 2 * b * s * (s + 1) * heads_dims,
        }[w.mode]
        layer = 2 * w.tokens * m.matmul_params_per_token() + attention
        total = num_layers * ceil_div(layer, t)
        if index == self.num_stages - 1 and m.vocab_size:
            total += ceil_div(2 * w.tokens * m.padded_vocab(t) * m.hidden_size, t)
        return total * (3 if w.mode == "training" else 1)

    def cost(self, index: int, num_layers: int) -> int:
        if self.cost_metric == "flops":
            return self.flops(index, num_layers)
        return self.working_set(index, num_layers).total

    def min_layers(self, index: int) -> int:
        """Middle stages hold at least one layer; the ends may hold only the embedding / output."""
        return 0 if self.num_stages > 1 and index in (0, self.num_stages - 1) else 1

    def partition(self, key: Callable[[int, int], Optional[tuple]]) -> Optional[List[int]]:
        """Layer counts minimising ``max`` over stages of ``key(index, count)``, or None.

        Exact: ``best[j]`` after stage ``k`` is the smallest bottleneck with which stages
        ``0..k`` can hold layers ``0..j-1``; each step tries every size of stage ``k``.
        Keys are tuples compared lexicographically; ``None`` forbids a stage.
        O(num_stages * num_layers^2) key lookups.
        """
        n_layers = self.model.num_layers
        best: List[Optional[tuple]] = [()] + [None] * n_layers
        choices: List[List[int]] = []
        for index in range(self.num_stages):
            keys = [
                key(index, count) if count >= self.min_layers(index) else None
                for count in range(n_layers + 1)
            ]
            new_best: List[Optional[tuple]] = [None] * (n_layers + 1)
            choice = [0] * (n_layers + 1)
            for end in range(n_layers + 1):
                for start in range(end + 1):
                    stage_key = keys[end - start]
                    if best[start] is None or stage_key is None:
                        continue
                    value = max(best[start], stage_key)
                    if new_best[end] is None or value < new_best[end]:
                        new_best[end], choice[end] = value, start
            best = new_best
            choices.append(choice)
        if best[n_layers] is None:
            return None
        counts, end = [], n_layers
        for choice in reversed(choices):
            counts.append(end - choice[end])
            end = choice[end]
        return counts[::-1]

    def fits_key(self, index: int, count: int) -> Optional[Tuple[int, int]]:
        """(cost, bytes) of a stage that fits the budget; None if it does not."""
        total = self.working_set(index, count).total
        return (self.cost(index, count), total) if total <= self.budget.bytes else None

    def bytes_key(self, index: int, count: int) -> Tuple[int]:
        return (self.working_set(index, count).total,)

    def plan(self, counts: Sequence[int]) -> "StagePlan":
        stages, first_layer = [], 0
        for index, count in enumerate(counts):
            working_set = self.working_set(index, count)
            stages.append(Stage(
                index=index,
                first_layer=first_layer,
                num_layers=count,
                working_set=working_set,
                cost=self.cost(index, count),
                fits=working_set.total <= self.budget.bytes,
            ))
            first_layer += count
        helix = split_layout(self.model, self.tensor_split)
        return StagePlan(self.model, self.workload, self.budget, self.tensor_split,
                         self.cost_metric, tuple(stages), helix)

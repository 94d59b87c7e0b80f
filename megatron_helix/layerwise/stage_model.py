"""One stage's working set and cost (bytes, FLOPs) and the exact DP over contiguous cuts.

The working-set formulas are stated in ``working_set``'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from megatron_helix.layerwise.budgets import Budget
from megatron_helix.layerwise.plan import Stage, StagePlan, split_layout
from megatron_helix.layerwise.working_set import (
    ModelShape,
    StageWorkingSet,
    Workload,
    _ceil_div,
)


@dataclass(frozen=True)
class _StageModel:
    """Working set and cost of a stage holding ``n`` decoder layers at position ``index``."""

    model: ModelShape
    workload: Workload
    budget: Budget
    tensor_split: int
    num_stages: int
    cost_metric: str

    def working_set(self, index: int, num_layers: int) -> StageWorkingSet:
        m, w, t = self.model, self.workload, self.tensor_split
        first, last = index == 0, index == self.num_stages - 1
        tokens, dtype = w.tokens, w.dtype_bytes
        params = num_layers * m.layer_params(t)
        touched_embedding_rows = 0
        if last:
            params += m.output_params(t)
        if first and m.vocab_size and (m.untie_embeddings_and_output_weights or not last):
            if self.budget.kind == "cache":
                touched_embedding_rows = min(tokens, m.padded_vocab(t) // t) * m.hidden_size
            else:
                params += m.embedding_params(t)
        weights = (params + touched_embedding_rows) * dtype

        logits = tokens * (m.padded_vocab(t) // t) if last else 0
        state = activations = 0
        if w.mode == "decode":
            state = num_layers * _ceil_div(2 * w.micro_batch_size * w.seq_length
                                           * m.query_groups * m.head_dim, t) * dtype
        if w.mode in ("decode", "forward"):
            widest = max(m.qkv_width + m.context_width,
                         m.active_experts * (m.fc1_width + m.ffn_hidden_size))
            layer_live = tokens * (3 * m.hidden_size + _ceil_div(widest, t)) if num_layers else 0
            activations = max(layer_live, logits) * dtype
        if w.mode == "training":
            state = params * w.training_state_bytes_per_param
            saved_width = (4 * m.hidden_size + m.qkv_width + m.context_width
                           + m.active_experts * (m.fc1_width + m.ffn_hidden_size))
            saved_layer = _ceil_div(
                tokens * (saved_width * dtype + 4 * m.num_attention_heads), t
            )
            in_flight = self.num_stages - index  # 1F1B: stage i holds p - i micro-batches
            activations = in_flight * (num_layers * saved_layer + logits * 4)  # fp32 logits
        return StageWorkingSet(weights, state, activations)

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
        total = num_layers * _ceil_div(layer, t)
        if index == self.num_stages - 1 and m.vocab_size:
            total += _ceil_div(2 * w.tokens * m.padded_vocab(t) * m.hidden_size, t)
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

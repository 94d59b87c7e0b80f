"""Megatron core-attention module for helix-partitioned heads.

Drop-in for ``DotProductAttention`` inside ``HelixSelfAttention``: it receives this rank's
heads restricted to its dim slice and returns its slice of the attention output, running one
of the two exact strategies across the slice group (``score_allreduce.py``,
``redistribute.py``), chosen per call by ``strategy.choose_strategy``.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core import tensor_parallel
from torch import Tensor

from megatron_helix import parallel_state as helix_state
from megatron_helix.attention.core_attention import CoreAttention
from megatron_helix.attention.redistribute import redistribute_attention
from megatron_helix.attention.score_allreduce import score_allreduce_attention
from megatron_helix.attention.sdpa import sdpa_attention
from megatron_helix.attention.strategy import (
    QUERY_BLOCK_SIZE,
    STRATEGIES,
    SliceGroupShape,
    choose_strategy,
)


class HelixCoreAttention(CoreAttention):
    """Exact attention over dim-sliced heads.

    Args: those of ``CoreAttention`` (``DotProductAttention``'s), and ``score_strategy``:
    ``auto``, ``allreduce`` or ``redistribute`` (set through the spec).
    """

    def __init__(
        self, *args, score_strategy: str = "auto", query_block_size: int = QUERY_BLOCK_SIZE,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.config.context_parallel_size > 1:
            raise NotImplementedError(
                "HelixCoreAttention runs one sequence shard; with --helix-ring-size > 1 the "
                "helix spec uses the ring core attention"
            )
        if score_strategy not in STRATEGIES:
            raise ValueError(f"--helix-score-strategy {score_strategy!r} not in {STRATEGIES}")
        self.score_strategy = score_strategy
        self.query_block_size = query_block_size
        self.last_strategy: Optional[str] = None  # the strategy of the latest call, for tests

    def _attend(
        self, query: Tensor, key: Tensor, value: Tensor, causal: bool, mask: Optional[Tensor],
        dropout_p: float,
    ) -> Tensor:
        """query ``[sq, b, h/n, d/m]``, key/value ``[sk, b, g/n, d/m]`` -> like query."""
        sq, b, h, dm = query.shape
        m = helix_state.get_helix_m()
        if m == 1:  # whole heads on this rank: nothing to combine (also without helix groups)
            self.last_strategy = "local"
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return sdpa_attention(query, key, value, causal, self.softmax_scale, mask,
                                      dropout_p)
        group = helix_state.get_helix_slice_group()
        shape = SliceGroupShape(
            m=m, batch=b, seq_q=sq, seq_kv=key.shape[0], heads=h,
            kv_heads=key.shape[2], slice_dim=dm, element_bytes=query.element_size(),
        )
        strategy = choose_strategy(
            self.score_strategy, shape, self.training, causal, self.query_block_size
        )
        self.last_strategy = strategy
        if strategy == "allreduce":
            with _dropout_stream(query.device, dropout_p) as generator:
                return score_allreduce_attention(
                    query, key, value, group, causal=causal, attention_mask=mask,
                    softmax_scale=self.softmax_scale, dropout_p=dropout_p, generator=generator,
                    query_block_size=self.query_block_size,
                )
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return redistribute_attention(
                query, key, value, group, causal, self.softmax_scale, mask, dropout_p
            )


def _dropout_stream(device: torch.device, dropout_p: float):
    """The slice group's shared dropout stream when there is dropout, else no generator."""
    if dropout_p > 0:
        return helix_state.helix_dropout_generator(device)
    return contextlib.nullcontext(None)

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
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_helix import parallel_state as helix_state
from megatron_helix.attention.redistribute import redistribute_attention
from megatron_helix.attention.score_allreduce import score_allreduce_attention
from megatron_helix.attention.sdpa import sdpa_attention
from megatron_helix.attention.strategy import (
    QUERY_BLOCK_SIZE,
    STRATEGIES,
    SliceGroupShape,
    choose_strategy,
)

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)
_MASKED_TYPES = (AttnMaskType.padding, AttnMaskType.padding_causal, AttnMaskType.arbitrary)


class HelixCoreAttention(MegatronModule):
    """Exact attention over dim-sliced heads.

    Args mirror ``megatron.core.transformer.dot_product_attention.DotProductAttention``;
    ``score_strategy`` is ``auto``, ``allreduce`` or ``redistribute`` (set through the spec).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        score_strategy: str = "auto",
        query_block_size: int = QUERY_BLOCK_SIZE,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise NotImplementedError(
                "HelixCoreAttention runs one sequence shard; with --helix-ring-size > 1 the "
                "helix spec uses the ring core attention"
            )
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"helix attention supports softmax_type 'vanilla', not {config.softmax_type!r}"
            )
        if score_strategy not in STRATEGIES:
            raise ValueError(f"--helix-score-strategy {score_strategy!r} not in {STRATEGIES}")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.score_strategy = score_strategy
        self.query_block_size = query_block_size
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.last_strategy: Optional[str] = None  # the strategy of the latest call, for tests

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """query ``[sq, b, h/n, d/m]``, key/value ``[sk, b, g/n, d/m]`` -> ``[sq, b, h/n * d/m]``."""
        if packed_seq_params is not None:
            raise NotImplementedError("helix attention does not support packed sequences (THD)")
        if attention_bias is not None:
            raise NotImplementedError("helix attention does not support an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in _CAUSAL_TYPES
        mask = attention_mask if mask_type in _MASKED_TYPES else None
        dropout_p = self.dropout_p if self.training else 0.0

        sq, b, h, dm = query.shape
        m = helix_state.get_helix_m()
        if m == 1:  # whole heads on this rank: nothing to combine (also without helix groups)
            self.last_strategy = "local"
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = sdpa_attention(query, key, value, causal, self.softmax_scale, mask, dropout_p)
            return out.reshape(sq, b, h * dm)
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
                out = score_allreduce_attention(
                    query, key, value, group, causal=causal, attention_mask=mask,
                    softmax_scale=self.softmax_scale, dropout_p=dropout_p, generator=generator,
                    query_block_size=self.query_block_size,
                )
        else:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = redistribute_attention(
                    query, key, value, group, causal=causal, attention_mask=mask,
                    softmax_scale=self.softmax_scale, dropout_p=dropout_p,
                )
        return out.reshape(sq, b, h * dm)


def _dropout_stream(device: torch.device, dropout_p: float):
    """The slice group's shared dropout stream when there is dropout, else no generator."""
    if dropout_p > 0:
        return helix_state.helix_dropout_generator(device)
    return contextlib.nullcontext(None)

"""Megatron core attention that runs ring attention over the context-parallel group.

Megatron's local ``DotProductAttention`` refuses context parallelism ("only supported by
TEDotProductAttention"); this module is the non-Transformer-Engine path. It takes the
constructor and forward signatures of megatron-core 0.16.1's ``DotProductAttention``, so a layer
spec can swap it in, and reads the ring from ``pg_collection.cp``: Megatron's
``get_batch_on_this_cp_rank`` already hands each rank its zigzag shard, and Megatron's loss and
gradient reductions over CP stay as they are.

The softmax runs in fp32 inside the flash kernel, so ``apply_query_key_layer_scaling`` (an fp16
overflow guard that cancels out mathematically) is not needed and the result equals
``DotProductAttention``'s. Attention dropout runs the ring at every context-parallel size, one
rank included, with position-keyed masks (``dropout_mask``) seeded from Megatron's RNG tracker,
so recomputation replays them and a ring of any size drops what one rank drops.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from torch import Tensor

from megatron_helix.attention.block_kernel import check_kernel_name
from megatron_helix.attention.ring_attention import ring_attention
from megatron_helix.attention.sdpa import sdpa_attention

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)
_MASKED = (AttnMaskType.padding, AttnMaskType.padding_causal, AttnMaskType.arbitrary)
_SUPPORTED = (
    "causal or unmasked self-attention on zigzag shards, with or without attention dropout, at "
    "any context-parallel size; padding or arbitrary masks only with context-parallel size 1"
)


class RingDotProductAttention(MegatronModule):
    """Exact core attention over Megatron's context-parallel ring, without Transformer Engine.

    Args mirror ``megatron.core.transformer.dot_product_attention.DotProductAttention``.
    ``cp_comm_type`` may be ``None`` or ``"p2p"`` (the ring); ``pg_collection`` must provide
    ``cp`` (default: Megatron's parallel state). ``block_kernel`` (``auto``, ``torch``,
    ``flash_attn``; set through the spec's ``params``) picks the ring's block kernel.
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
        block_kernel: str = "auto",
    ):
        super().__init__(config=config)
        check_kernel_name(block_kernel)
        if cp_comm_type not in (None, "p2p"):
            raise ValueError(
                f"RingDotProductAttention is the p2p ring; cp_comm_type {cp_comm_type!r} is not "
                "supported (use None or 'p2p')"
            )
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"RingDotProductAttention supports softmax_type 'vanilla', not "
                f"{config.softmax_type!r}"
            )
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            raise ValueError("RingDotProductAttention does not support sliding-window attention")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        if getattr(pg_collection, "cp", None) is None:
            raise ValueError("RingDotProductAttention needs pg_collection.cp, the ring's group")
        self.cp_group = pg_collection.cp
        self.block_kernel = block_kernel
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = (
            config.kv_channels ** -0.5 if softmax_scale is None else softmax_scale
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

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
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> ``[sq, b, np * hn]``.

        With ``AttnMaskType.causal`` the mask is implied by the positions (as in
        ``TEDotProductAttention``) and ``attention_mask`` is not read; the padding and
        arbitrary types read it (``[b, 1, sq, sk]``, True = masked out).
        """
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type in _CAUSAL
        mask = attention_mask if mask_type in _MASKED else None
        dropout_p = self.dropout_p if self.training else 0.0
        self._refuse_unsupported(mask, attention_bias, packed_seq_params)
        with self._dropout_rng(dropout_p):
            if mask is None:
                out = ring_attention(
                    query, key, value, causal, self.softmax_scale, self.cp_group,
                    self.block_kernel, dropout_p,
                )
            else:
                out = sdpa_attention(
                    query, key, value, causal, self.softmax_scale, mask, dropout_p)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def _dropout_rng(self, dropout_p: float):
        """Megatron's ``DotProductAttention`` draws dropout from the model-parallel RNG unless
        sequence parallel is on; the tracker is only touched when there is dropout."""
        if dropout_p > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return nullcontext()

    def _refuse_unsupported(
        self, mask: Optional[Tensor], attention_bias: Optional[Tensor],
        packed_seq_params: Optional[PackedSeqParams],
    ) -> None:
        unsupported = []
        if packed_seq_params is not None:
            unsupported.append("packed sequences (packed_seq_params / THD)")
        if attention_bias is not None:
            unsupported.append("an attention bias")
        cp_size = dist.get_world_size(self.cp_group)
        if cp_size > 1:
            if mask is not None:
                unsupported.append("a padding or arbitrary mask with context parallelism")
            if self.attention_type != "self":
                unsupported.append(f"{self.attention_type} attention with context parallelism")
        if unsupported:
            raise NotImplementedError(
                f"RingDotProductAttention (context-parallel size {cp_size}) does not support "
                f"{', '.join(unsupported)}; supported: {_SUPPORTED}"
            )

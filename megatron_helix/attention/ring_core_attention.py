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
from megatron.core.transformer.utils import is_layer_window_attention
from torch import Tensor

from megatron_helix.attention.block_kernel import check_kernel_name
from megatron_helix.attention.core_attention import CoreAttention
from megatron_helix.attention.ring_attention import ring_attention
from megatron_helix.attention.sdpa import sdpa_attention

_SUPPORTED = (
    "causal or unmasked self-attention on zigzag shards, with or without attention dropout, at "
    "any context-parallel size; padding or arbitrary masks only with context-parallel size 1"
)


class RingDotProductAttention(CoreAttention):
    """Exact core attention over Megatron's context-parallel ring, without Transformer Engine.

    Args: those of ``CoreAttention`` (``DotProductAttention``'s). ``cp_comm_type`` may be
    ``None`` or ``"p2p"`` (the ring); ``pg_collection`` must provide ``cp`` (default:
    Megatron's parallel state). ``block_kernel`` (``block_kernel.KERNEL_CHOICES``; set through
    the spec's ``params``) picks the ring's block kernel.
    """

    def __init__(self, *args, block_kernel: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        check_kernel_name(block_kernel)
        if self.cp_comm_type not in (None, "p2p"):
            raise ValueError(
                f"RingDotProductAttention is the p2p ring; cp_comm_type {self.cp_comm_type!r} "
                "is not supported (use None or 'p2p')"
            )
        if is_layer_window_attention(
            self.config.window_size, self.config.window_attn_skip_freq, self.layer_number
        ):
            raise ValueError("RingDotProductAttention does not support sliding-window attention")
        pg_collection = self.pg_collection
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        if getattr(pg_collection, "cp", None) is None:
            raise ValueError("RingDotProductAttention needs pg_collection.cp, the ring's group")
        self.cp_group = pg_collection.cp
        self.block_kernel = block_kernel

    def _attend(
        self, query: Tensor, key: Tensor, value: Tensor, causal: bool, mask: Optional[Tensor],
        dropout_p: float,
    ) -> Tensor:
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> ``[sq, b, np, hn]``."""
        with self._dropout_rng(dropout_p):
            if mask is None:
                return ring_attention(
                    query, key, value, causal, self.softmax_scale, self.cp_group,
                    self.block_kernel, dropout_p,
                )
            return sdpa_attention(query, key, value, causal, self.softmax_scale, mask, dropout_p)

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

"""A ``TransformerConfig`` for helix layouts with more ranks than heads.

megatron-core's ``TransformerConfig`` requires the heads (and query groups) to divide by the
tensor-parallel size, because plain TP gives every rank whole heads. Helix gives a rank
``H/n`` heads cut into ``m`` dim slices, so only ``n`` must divide them (checked, with better
messages, by ``parallel_dims``): 8 heads on helix 4 x 4 = 16 ranks is legal. The config is
therefore validated at TP = ``n`` and then given the real size ``m * n``; the expert tensor
size defaults to ``m * n`` as Megatron would have set it.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig


def helix_transformer_config(helix_m: int = 1, **kwargs) -> TransformerConfig:
    """``TransformerConfig(**kwargs)`` whose ``tensor_model_parallel_size`` is a helix group."""
    tp = kwargs.get("tensor_model_parallel_size", 1)
    heads = kwargs["num_attention_heads"]
    groups = kwargs.get("num_query_groups") or heads
    if helix_m == 1 or (heads % tp == 0 and (groups % tp == 0 or tp % groups == 0)):
        return TransformerConfig(**kwargs)
    n = tp // helix_m
    sequence_parallel = kwargs.get("sequence_parallel", False)
    checked = dict(
        kwargs, tensor_model_parallel_size=n, expert_tensor_parallel_size=kwargs.get(
            "expert_tensor_parallel_size") or tp,
        sequence_parallel=sequence_parallel and n > 1,
    )
    config = TransformerConfig(**checked)
    config.tensor_model_parallel_size = tp
    config.sequence_parallel = sequence_parallel
    return config

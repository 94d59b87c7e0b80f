"""A ``TransformerConfig`` for helix layouts with more ranks than heads.

megatron-core's ``TransformerConfig`` requires the heads to divide by the tensor-parallel size,
because plain TP gives every rank whole heads. Helix gives a rank ``H/n`` heads cut into ``m``
dim slices, so only ``n`` must divide them (checked, with better messages and before any process
group exists, by ``parallel_dims``): 6 heads on helix 2 x 2 = 4 ranks is legal.
``HelixTransformerConfig`` therefore runs Megatron's checks at TP = ``n`` and then holds the real
size ``m * n``: megatron-core's ``__post_init__`` has no hook to relax that one rule, so the size
is swapped around it, only for layouts plain TP would refuse, and in this one place. Megatron-LM builds it through ``core_transformer_config_from_args``'s
``config_class`` (every dataclass field, ``helix_m`` included, is read from the args).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_helix.layout import layout_errors
from megatron_helix.parallel_dims import HelixConfigError


@dataclass
class HelixTransformerConfig(TransformerConfig):
    """``TransformerConfig`` whose ``tensor_model_parallel_size`` is a helix group of
    ``helix_m`` dim slices times ``n`` head groups."""

    helix_m: int = 1
    """Dim slices per attention head (``--helix-m``)."""

    def __post_init__(self) -> None:
        tp = self.tensor_model_parallel_size
        groups = self.num_query_groups or self.num_attention_heads
        self._check_helix_layout(tp, groups)
        plain_tp_holds = self.num_attention_heads % tp == 0 and (
            groups % tp == 0 or tp % groups == 0)
        if self.helix_m == 1 or plain_tp_holds:
            super().__post_init__()
            return
        sequence_parallel = self.sequence_parallel
        if self.expert_tensor_parallel_size is None:
            self.expert_tensor_parallel_size = tp  # Megatron's default, from the real size
        # megatron-core 0.19 derives gtp_weight_remat_size = tensor_parallel_num_weight_shards
        # // TP in __post_init__; the shard count (TP x 1 from Megatron-LM's args) is swapped
        # with TP so that stays 1 instead of becoming m.
        shards = getattr(self, "tensor_parallel_num_weight_shards", None)
        self.tensor_model_parallel_size = tp // self.helix_m
        self.sequence_parallel = sequence_parallel and self.tensor_model_parallel_size > 1
        if shards is not None:
            self.tensor_parallel_num_weight_shards = shards // self.helix_m
        super().__post_init__()
        self.tensor_model_parallel_size = tp
        self.sequence_parallel = sequence_parallel
        if hasattr(self, "tensor_parallel_num_weight_shards"):
            self.tensor_parallel_num_weight_shards = (
                shards if shards is not None else tp * self.gtp_weight_remat_size)

    def _check_helix_layout(self, tp: int, groups: int) -> None:
        """The helix rules Megatron's own checks would report in plain-TP terms (or not at
        all), named by the helix sizes; before any module is built. The head dim is checked
        against ``m`` here and against ``2m`` (RoPE pairs) by the attention, which knows the
        position embedding."""
        m = self.helix_m
        if m < 1 or tp % m:
            raise HelixConfigError(
                f"tensor_model_parallel_size {tp} must be --helix-m {m} x --helix-n (the helix "
                f"group is the tensor-parallel group)"
            )
        head_dim = self.kv_channels or self.hidden_size // self.num_attention_heads
        problems = layout_errors(m, tp // m, self.num_attention_heads, groups, head_dim, "none")
        if problems:
            raise HelixConfigError(
                f"invalid helix layout --helix-m {m} x --helix-n {tp // m}:\n  - "
                + "\n  - ".join(problems)
            )

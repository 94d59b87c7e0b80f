"""Megatron's core-attention interface, shared by the helix and ring core attentions.

A layer spec swaps a core attention in by module: Megatron builds it with the constructor
arguments of megatron-core 0.16.1's ``DotProductAttention`` and calls it with that module's
forward arguments. ``CoreAttention`` takes both and resolves what every kernel here needs, as
``DotProductAttention`` does: whether the mask is causal, whether ``attention_mask`` is read
at all, the softmax scale, and the dropout probability (zero in eval). A subclass refuses what
it cannot run and attends ``[sq, b, heads, dim]`` queries in ``_attend``.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)
_MASKED = (AttnMaskType.padding, AttnMaskType.padding_causal, AttnMaskType.arbitrary)


class CoreAttention(MegatronModule):
    """Args mirror ``megatron.core.transformer.dot_product_attention.DotProductAttention``.

    ``cp_comm_type`` and ``pg_collection`` are kept as given (``None``: Megatron's parallel
    state) for subclasses that talk over a group.
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
    ):
        super().__init__(config=config)
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"{type(self).__name__} supports softmax_type 'vanilla', not "
                f"{config.softmax_type!r}"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type
        self.pg_collection = pg_collection
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
        """query ``[sq, b, h, d]``, key/value ``[sk, b, g, d]`` -> ``[sq, b, h * d]``.

        With ``AttnMaskType.causal`` the mask is implied by the positions (as in
        ``TEDotProductAttention``) and ``attention_mask`` is not read; the padding and
        arbitrary types read it (``[b, 1, sq, sk]``, True = masked out).
        """
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type in _CAUSAL
        mask = attention_mask if mask_type in _MASKED else None
        self._refuse_unsupported(mask, attention_bias, packed_seq_params)
        dropout_p = self.dropout_p if self.training else 0.0
        out = self._attend(query, key, value, causal, mask, dropout_p)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def _refuse_unsupported(
        self, mask: Optional[Tensor], attention_bias: Optional[Tensor],
        packed_seq_params: Optional[PackedSeqParams],
    ) -> None:
        """No kernel here takes packed sequences (THD) or an attention bias."""
        for what, given in (("packed sequences (THD)", packed_seq_params),
                            ("an attention bias", attention_bias)):
            if given is not None:
                raise NotImplementedError(f"{type(self).__name__} does not support {what}")

    def _attend(
        self, query: Tensor, key: Tensor, value: Tensor, causal: bool, mask: Optional[Tensor],
        dropout_p: float,
    ) -> Tensor:
        """query ``[sq, b, h, d]``, key/value ``[sk, b, g, d]`` -> ``[sq, b, h, d]``."""
        raise NotImplementedError

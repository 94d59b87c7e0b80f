"""Whole-head attention on one rank through torch's fused scaled-dot-product kernels.

The shared local path of the core attentions: Megatron's ``[s, b, heads, dim]`` layout and
mask convention (True = forbidden) in, flash / memory-efficient SDPA underneath.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right


def sdpa_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    causal: bool,
    scale: float,
    mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """query ``[sq, b, h, d]``, key/value ``[sk, b, g, d]`` -> ``[sq, b, h, d]``.

    ``causal`` aligns the mask bottom-right (query ``i`` sits at position ``sk - sq + i``), which
    is top-left when ``sq == sk`` and what a query chunk attending its key prefix needs.
    ``mask`` is ``[b|1, 1, sq, sk]`` with True where attention is forbidden (Megatron's way).
    """
    sq, sk = query.shape[0], key.shape[0]
    bias = None
    if mask is not None:
        bias = ~mask
        if causal:
            rows = torch.arange(sk - sq, sk, device=query.device).unsqueeze(1)
            bias = bias & (torch.arange(sk, device=query.device) <= rows)
    elif causal:
        bias = causal_lower_right(sq, sk)
    out = F.scaled_dot_product_attention(
        query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
        attn_mask=bias, dropout_p=dropout_p, scale=scale,
        enable_gqa=query.shape[2] != key.shape[2],
    )
    return out.permute(2, 0, 1, 3)

"""Helix strategy 2: redistribute from dim slices to token slices, attend, and back.

Inside a slice group of ``m`` ranks every rank holds all ``s`` tokens of its heads with
``d/m`` dims. One all-to-all turns queries into ``s/m`` tokens with the full head dim; keys and
values are all-gathered to the full dim. Each rank then runs ordinary flash attention for its
query tokens and a second all-to-all returns the output to dim slices.

Query tokens are dealt in the zigzag order (``2m`` chunks, rank ``j`` takes chunks ``j`` and
``2m-1-j``) so every rank has the same causal work. Head dims arrive in slice order, which
permutes ``d`` identically for q, k and v: dot products, and therefore the result, are
unchanged, and the inverse all-to-all puts every dim back on its owner.

Volume per layer and rank: about ``s * (H/n) * d * (2 + 2 G/H) / m`` elements forward — linear in
``s``, which is what long prefill and training want.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import all_to_all
from torch import Tensor

from megatron_helix.attention.sdpa import sdpa_attention
from megatron_helix.attention.zigzag import zigzag_chunks
from megatron_helix.collectives import all_gather_stacked


def _dims_to_tokens(x: Tensor, m: int, group) -> Tensor:
    """``[2m, c, b, h, d/m]`` (all chunks, my dims) -> ``[2, c, b, h, d]`` (my chunks, all dims)."""
    order = [chunk for j in range(m) for chunk in zigzag_chunks(j, m)]
    send = x[order].reshape((m, 2) + x.shape[1:])  # slot j: chunks of rank j
    received = all_to_all(group, send)  # slot j: my chunks, dims of rank j
    return received.permute(1, 2, 3, 4, 0, 5).flatten(-2)


def _tokens_to_dims(y: Tensor, m: int, group) -> Tensor:
    """Inverse of ``_dims_to_tokens``: ``[2, c, b, h, d]`` -> ``[2m, c, b, h, d/m]``."""
    two, c, b, h, d = y.shape
    send = y.view(two, c, b, h, m, d // m).permute(4, 0, 1, 2, 3, 5)  # slot j: dims of rank j
    received = all_to_all(group, send)  # slot j: chunks of rank j, my dims
    order = [chunk for j in range(m) for chunk in zigzag_chunks(j, m)]
    inverse = [order.index(chunk) for chunk in range(2 * m)]
    return received.reshape((2 * m,) + received.shape[2:])[inverse]


def redistribute_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group: dist.ProcessGroup,
    causal: bool,
    scale: float,
    mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``sdpa_attention`` of dim-sliced heads via token redistribution inside the slice ``group``.

    The arguments are those of ``sdpa_attention``, the kernel every rank runs on its query
    tokens, after the group.

    Args:
        query: ``[s, b, h, d/m]``; key, value: ``[s, b, g, d/m]`` (GQA not expanded).
        group: the slice group of ``m`` ranks.
        causal: causal self-attention (``sq == sk``).
        scale: the softmax scale, for the full head dim ``d`` (not ``d/m``).
        mask: optional bool ``[b|1, 1, s, s]``, True where attention is forbidden.
        dropout_p: attention dropout, drawn independently per token chunk.

    Returns:
        ``[s, b, h, d/m]``, this rank's dims of the output.
    """
    m = dist.get_world_size(group)
    s, b, h, dm = query.shape
    if key.shape[0] != s:
        raise ValueError(f"redistribute needs self-attention shapes: sq={s}, sk={key.shape[0]}")
    if s % (2 * m):
        raise ValueError(
            f"the redistribute strategy deals 2*m = {2 * m} sequence chunks; sequence length "
            f"{s} is not divisible by it (use --helix-score-strategy allreduce)"
        )
    c = s // (2 * m)
    q = _dims_to_tokens(query.view(2 * m, c, b, h, dm), m, group)  # [2, c, b, h, d]
    k = all_gather_stacked(key, group).permute(1, 2, 3, 0, 4).flatten(-2)  # [s, b, g, d]
    v = all_gather_stacked(value, group).permute(1, 2, 3, 0, 4).flatten(-2)
    me = dist.get_rank(group)
    chunks = []
    for i, chunk in enumerate(zigzag_chunks(me, m)):
        q0 = chunk * c
        key_end = q0 + c if causal else s  # a causal chunk sees only its key prefix
        chunk_mask = None if mask is None else mask[:, :, q0:q0 + c, :key_end]
        chunks.append(sdpa_attention(q[i], k[:key_end], v[:key_end], causal, scale, chunk_mask,
                                     dropout_p))
    out = torch.stack(chunks)
    return _tokens_to_dims(out, m, group).reshape(s, b, h, dm)

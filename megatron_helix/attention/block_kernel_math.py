"""The ``math`` block kernel: explicit scores, the one block kernel with attention dropout.

Dropout multiplies the block's *global* probabilities ``P = exp(scale q k^T - lse)`` by
``keep / (1 - p)`` before ``P v``, while the log-sum-exp stays the undropped one. Blocks merge
by their LSE exactly as without dropout (the merge is linear in each block's output), and the
backward of a block, given the rows' final output and LSE, is its exact share:

    dV = (P * keep / (1-p))^T dO
    dP = (dO V^T) * keep / (1-p)
    dS = P * (dP - rowsum(dO * O))      (rowsum(dO * O) = sum_j P_ij dP_ij, O being dropped)
    dQ = scale dS K,  dK = scale dS^T Q

The ``[b, h, sq, sk]`` scores are materialized in fp32, so this kernel is for the contexts that
train with attention dropout, not for 100k-token ones (which use the flash kernels, without).
``keep`` is the block's bool mask (``dropout_mask.keep_mask``); ``None`` means no dropout.
Layout as in ``block_kernel``: q ``[sq, b, h, d]``, k/v ``[sk, b, g, d]``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _expand(kv: Tensor, heads: int) -> Tensor:
    """``[s, b, g, d]`` -> ``[s, b, heads, d]``, query head ``i`` on group ``i // (heads/g)``."""
    return kv.repeat_interleave(heads // kv.shape[2], dim=2)


def _reduce(grad: Tensor, groups: int) -> Tensor:
    """Inverse of ``_expand`` for gradients: sum each group's heads."""
    s, b, heads, d = grad.shape
    return grad.view(s, b, groups, heads // groups, d).sum(3)


def _scores(q: Tensor, k: Tensor, causal: bool, softmax_scale: float) -> Tensor:
    """``scale q k^T`` ``[b, h, sq, sk]`` fp32, -inf above the diagonal when ``causal``."""
    scores = torch.einsum("qbhd,kbhd->bhqk", q.float(), _expand(k, q.shape[2]).float())
    scores = scores * softmax_scale
    if causal:
        above = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return scores


def _dropped(probs: Tensor, keep: Optional[Tensor], dropout_p: float) -> Tensor:
    return probs if keep is None else probs * keep / (1.0 - dropout_p)


def forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float,
    keep: Optional[Tensor] = None, dropout_p: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """-> out ``[sq, b, h, d]`` (q's dtype), lse ``[sq, b, h]`` fp32 (of the undropped
    scores)."""
    scores = _scores(q, k, causal, softmax_scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = _dropped(torch.exp(scores - lse.unsqueeze(-1)), keep, dropout_p)
    out = torch.einsum("bhqk,kbhd->qbhd", probs, _expand(v, q.shape[2]).float())
    return out.to(q.dtype), lse.permute(2, 0, 1)


def backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, softmax_scale: float, keep: Optional[Tensor] = None, dropout_p: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> dq ``[sq, b, h, d]``, dk, dv ``[sk, b, g, d]`` given the rows' final out and lse."""
    heads, groups = q.shape[2], k.shape[2]
    probs = torch.exp(_scores(q, k, causal, softmax_scale) - lse.permute(1, 2, 0).unsqueeze(-1))
    dout32 = dout.float()
    dv = torch.einsum("bhqk,qbhd->kbhd", _dropped(probs, keep, dropout_p), dout32)
    dprobs = _dropped(torch.einsum("qbhd,kbhd->bhqk", dout32, _expand(v, heads).float()),
                      keep, dropout_p)
    correction = (dout32 * out.float()).sum(-1).permute(1, 2, 0).unsqueeze(-1)  # [b, h, sq, 1]
    dscores = probs * (dprobs - correction) * softmax_scale
    dq = torch.einsum("bhqk,kbhd->qbhd", dscores, _expand(k, heads).float())
    dk = torch.einsum("bhqk,qbhd->kbhd", dscores, q.float())
    return dq.to(q.dtype), _reduce(dk, groups).to(k.dtype), _reduce(dv, groups).to(v.dtype)

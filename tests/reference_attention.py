"""Plain softmax attention in fp64: the reference the attention tests compare against."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """q ``[sq, b, h, d]``, k/v ``[sk, b, g, d]`` -> out ``[sq, b, h, d]``, lse ``[sq, b, h]``,
    both fp64 and differentiable in q, k and v.

    Query head ``i`` uses key/value group ``i // (h/g)`` (Megatron's ``repeat_interleave``
    order); the scale is ``d ** -0.5``. ``causal`` is aligned bottom-right (the ``sk - sq``
    leading keys are always visible); ``mask`` ``[b|1, h|1, sq, sk]`` is True where masked out;
    ``keep`` is a dropout keep-mask ``[b, h, sq, sk]`` already scaled by ``1 / (1 - p)``.
    """
    qd, kd, vd = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
    repeat = qd.shape[1] // kd.shape[1]
    kd, vd = kd.repeat_interleave(repeat, 1), vd.repeat_interleave(repeat, 1)
    scores = qd @ kd.transpose(-1, -2) * q.shape[-1] ** -0.5
    sq, sk = scores.shape[-2:]
    if causal:
        allowed = torch.arange(sk)[None] <= torch.arange(sq)[:, None] + (sk - sq)
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    probs = scores.softmax(-1)
    if keep is not None:
        probs = probs * keep.double()
    return (probs @ vd).permute(2, 0, 1, 3), scores.logsumexp(-1).permute(2, 0, 1)


BATCH, HEAD_DIM = 2, 8  # the shapes attention_inputs makes by default
FP32_TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 kernels against the fp64 reference
BF16_TOL = dict(rtol=3e-2, atol=3e-2)  # bf16 kernels: a few units of bf16 rounding


def attention_inputs(
    sq: int, sk: int, heads: int, groups: int, dtype: torch.dtype = torch.float32,
    head_dim: int = HEAD_DIM,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Seeded q ``[sq, BATCH, heads, d]``, k, v ``[sk, BATCH, groups, d]`` and an upstream
    gradient shaped like q."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sq, BATCH, heads, head_dim, generator=gen)
    k = torch.randn(sk, BATCH, groups, head_dim, generator=gen)
    v = torch.randn(sk, BATCH, groups, head_dim, generator=gen)
    dout = torch.randn(sq, BATCH, heads, head_dim, generator=gen)
    return tuple(x.to(dtype) for x in (q, k, v, dout))


def reference_with_grads(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, causal: bool, mask: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """``reference_attention`` and its input gradients for ``dout`` -> out, lse, (dq, dk, dv),
    computed in fp64 and returned in fp32 (on q's device)."""
    q, k, v = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    out, lse = reference_attention(q, k, v, causal, mask, keep)
    grads = torch.autograd.grad(out, (q, k, v), dout.double())
    return out.detach().float(), lse.detach().float(), tuple(g.float() for g in grads)

"""Helix strategy 1: all-reduce partial scores across the slice group.

Each of the ``m`` ranks of a slice group holds every token of its heads, restricted to ``d/m``
of the head dims. ``q . k`` sums over all ``d`` dims, so a rank's ``q_j k_j^T`` is a partial
sum: all-reducing it gives the exact scores, after which every rank holds the same softmax
``P`` and ``P @ v_j`` is directly its slice of the output. No rank ever sees the full head.

Backward recomputes the scores (one all-reduce) and needs ``dP = dO v^T``, again a sum over
dims (a second all-reduce); both travel in one collective. Work is done in query blocks so no
``s x s`` tensor is ever whole, and causal blocks stop at the diagonal instead of masking.

Volume per layer and rank: ``b * (H/n) * s_q * s_kv`` score elements forward, twice that
backward — negligible for decode (``s_q = 1``), ruinous for long prefill, where the
redistribute strategy wins (see ``strategy.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_helix.attention.strategy import QUERY_BLOCK_SIZE, query_blocks

_NEG_INF = float("-inf")


def _masked_scores(
    partial: Tensor,
    q0: int,
    q1: int,
    k1: int,
    sq: int,
    sk: int,
    scale: float,
    causal: bool,
    mask: Optional[Tensor],
) -> Tensor:
    """Scaled fp32 scores ``[b, g, r, q1-q0, k1]`` with causal/padding positions at -inf."""
    scores = partial * scale
    if causal:
        rows = torch.arange(q0, q1, device=scores.device).unsqueeze(1) + (sk - sq)
        cols = torch.arange(k1, device=scores.device).unsqueeze(0)
        scores = scores.masked_fill(cols > rows, _NEG_INF)
    if mask is not None:  # [b|1, 1, sq, sk], True = masked out (Megatron's convention)
        block_mask = mask[:, :, q0:q1, :k1].unsqueeze(2)  # [b|1, 1, 1, rows, k1]
        scores = scores.masked_fill(block_mask, _NEG_INF)
    return scores


def _probs(scores: Tensor, lse: Tensor) -> Tensor:
    """``exp(scores - lse)`` with fully masked rows (lse = -inf) giving zeros, not NaN."""
    return torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))


def _dropout_keep(shape, p: float, generator: Optional[torch.Generator], device) -> Tensor:
    """Keep-mask scaled by ``1/(1-p)``; identical on every slice rank given the same generator."""
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(torch.float32) / (1.0 - p)


def _scores_partial(q: Tensor, k: Tensor, q0: int, q1: int, k1: int) -> Tensor:
    """Local partial ``q_j k_j^T`` in fp32: q ``[b, g, r, sq, dm]``, k ``[b, g, sk, dm]``."""
    b, g, r, _, dm = q.shape
    qb = q[:, :, :, q0:q1].reshape(b, g, r * (q1 - q0), dm)
    return torch.matmul(qb.float(), k[:, :, :k1].float().transpose(-1, -2)).view(
        b, g, r, q1 - q0, k1
    )


def _score_allreduce_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Optional[Tensor], scale: float,
    dropout_p: float, generator: Optional[torch.Generator], block: int, group,
) -> Tuple[Tensor, Tensor]:
    """q ``[b, g, r, sq, dm]``, k/v ``[b, g, sk, dm]`` -> out like q, lse ``[b, g, r, sq]`` fp32."""
    b, g, r, sq, dm = q.shape
    sk = k.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full((b, g, r, sq), _NEG_INF, dtype=torch.float32, device=q.device)
    for q0, q1, k1 in query_blocks(sq, sk, causal, block):
        partial = _scores_partial(q, k, q0, q1, k1)
        dist.all_reduce(partial, group=group)
        scores = _masked_scores(partial, q0, q1, k1, sq, sk, scale, causal, mask)
        block_lse = torch.logsumexp(scores, dim=-1)
        probs = _probs(scores, block_lse)
        if dropout_p > 0:
            probs = probs * _dropout_keep(probs.shape, dropout_p, generator, q.device)
        lse[:, :, :, q0:q1] = block_lse
        pv = torch.matmul(probs.view(b, g, r * (q1 - q0), k1).to(v.dtype), v[:, :, :k1])
        out[:, :, :, q0:q1] = pv.view(b, g, r, q1 - q0, dm)
    return out, lse


def _score_allreduce_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, causal: bool,
    mask: Optional[Tensor], scale: float, dropout_p: float,
    generator: Optional[torch.Generator], block: int, group,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``_score_allreduce_forward`` for this rank's dim slice (fp32 accumulation).

    With ``P`` the softmax, ``Z = P * keep`` (dropout) and ``dZ = dO v^T`` (summed over all dims,
    hence all-reduced), ``dS = P * (dZ * keep - rowsum(P * dZ * keep))``.
    """
    b, g, r, sq, dm = q.shape
    sk = k.shape[2]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for q0, q1, k1 in query_blocks(sq, sk, causal, block):
        rows = r * (q1 - q0)
        do = dout[:, :, :, q0:q1].reshape(b, g, rows, dm).float()
        both = torch.stack(
            (
                _scores_partial(q, k, q0, q1, k1),
                torch.matmul(do, v[:, :, :k1].float().transpose(-1, -2)).view(b, g, r, q1 - q0, k1),
            )
        )
        dist.all_reduce(both, group=group)
        scores = _masked_scores(both[0], q0, q1, k1, sq, sk, scale, causal, mask)
        probs = _probs(scores, lse[:, :, :, q0:q1])
        dprobs = both[1]
        kept = probs
        if dropout_p > 0:
            keep = _dropout_keep(probs.shape, dropout_p, generator, q.device)
            dprobs = dprobs * keep
            kept = probs * keep
        dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
        dscores = dscores.view(b, g, rows, k1)
        dv[:, :, :k1] += torch.matmul(kept.view(b, g, rows, k1).transpose(-1, -2), do)
        qb = q[:, :, :, q0:q1].reshape(b, g, rows, dm).float()
        dq[:, :, :, q0:q1] = (
            torch.matmul(dscores, k[:, :, :k1].float()).view(b, g, r, q1 - q0, dm) * scale
        )
        dk[:, :, :k1] += torch.matmul(dscores.transpose(-1, -2), qb) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class ScoreAllReduceAttention(torch.autograd.Function):
    """Exact attention over dim-sliced heads; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, causal, mask, scale, dropout_p, generator, block, group):
        rng_state = generator.get_state() if (dropout_p > 0 and generator is not None) else None
        out, lse = _score_allreduce_forward(
            q, k, v, causal, mask, scale, dropout_p, generator, block, group
        )
        ctx.save_for_backward(q, k, v, lse)
        ctx.args = (causal, mask, scale, dropout_p, generator, rng_state, block, group)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lse = ctx.saved_tensors
        causal, mask, scale, dropout_p, generator, rng_state, block, group = ctx.args
        if rng_state is not None:  # replay the forward's dropout masks
            after_forward = generator.get_state()
            generator.set_state(rng_state)
        dq, dk, dv = _score_allreduce_backward(
            dout, q, k, v, lse, causal, mask, scale, dropout_p, generator, block, group
        )
        if rng_state is not None:
            generator.set_state(after_forward)
        return dq, dk, dv, None, None, None, None, None, None, None


def score_allreduce_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group: dist.ProcessGroup,
    causal: bool = True,
    attention_mask: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    query_block_size: int = QUERY_BLOCK_SIZE,
) -> Tensor:
    """Attention of dim-sliced heads, exact across the slice ``group``.

    Args:
        query: ``[sq, b, h, d/m]``, this rank's dims of its heads.
        key, value: ``[sk, b, g, d/m]`` with ``g`` dividing ``h`` (GQA, not expanded).
        group: the slice group (the ``m`` ranks holding the other dims of these heads).
        causal: causal mask aligned to the last key (``sk - sq`` leading keys always visible).
        attention_mask: optional bool ``[b|1, 1, sq, sk]``, True where attention is forbidden.
        softmax_scale: defaults to ``1/sqrt(d)`` of the *full* head dim.
        dropout_p: attention dropout; ``generator`` must produce the same stream on every rank
            of the slice group (all of them apply one shared probability matrix).
        query_block_size: queries per block; bounds the score buffer to ``b*h*block*sk``.

    Returns:
        ``[sq, b, h, d/m]``: this rank's dims of the attention output.
    """
    sq, b, h, dm = query.shape
    sk, _, g, _ = key.shape
    if h % g:
        raise ValueError(f"query heads {h} must be a multiple of key/value heads {g}")
    if softmax_scale is None:
        softmax_scale = (dm * dist.get_world_size(group)) ** -0.5
    # [sq, b, h, dm] -> [b, g, r, sq, dm]; [sk, b, g, dm] -> [b, g, sk, dm]
    q = query.permute(1, 2, 0, 3).reshape(b, g, h // g, sq, dm)
    k = key.permute(1, 2, 0, 3)
    v = value.permute(1, 2, 0, 3)
    out = ScoreAllReduceAttention.apply(
        q, k, v, causal, attention_mask, softmax_scale, dropout_p, generator,
        query_block_size, group,
    )
    return out.reshape(b, h, sq, dm).permute(2, 0, 1, 3)

"""Ring attention: exact attention over a sequence sharded across a process group.

Each of ``R`` ranks holds a zigzag shard (``zigzag.py``) of q, k and v. Forward, step ``t``
attends the local queries to the key/value shard of rank ``r - t``, which arrived from the
previous rank while step ``t - 1`` computed; the shard is forwarded to the next rank by an async
send posted *before* the block compute and waited *after* it, so communication hides behind
attention. Block results are merged in fp32 by their log-sum-exp (``merge_block_``). Under a
causal mask step 0 is the diagonal block and every later step computes only the ``c x 2c``
visible pairs (``zigzag_block``): nothing is computed and then masked, and all ranks do equal
work.

Backward is its own ring pass, not autograd through the communication: k and v travel again,
and with them fp32 accumulators of their gradients. Each rank adds its block's dk/dv to the
accumulator of the shard it holds and passes it on; after ``R`` steps every accumulator is back
with its owner holding the contributions of all ranks. dq accumulates locally in fp32. Each
block's gradient uses the rows' final output and LSE, which makes it the exact share of the full
gradient. GQA k/v travel un-expanded (``g`` groups, not ``h`` heads).

Attention dropout keys each entry's keep decision to its global (batch, head, query, key)
position and one seed drawn from the caller's RNG (``dropout_mask``): a block rebuilds its piece
of the mask in the forward and again in the backward, nothing is stored, and a ring of any size
drops what one device drops. Blocks with dropout run the ``math`` kernel.

Tensors are Megatron's core-attention layout: q ``[s_local, b, h, d]``, k/v
``[s_local, b, g, d]``, output ``[s_local, b, h, d]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_helix.attention.block_kernel import (
    block_attention_backward,
    block_attention_forward,
    check_qkv,
    merge_block_,
    select_kernel,
)
from megatron_helix.attention.dropout_mask import draw_seed, keep_mask
from megatron_helix.attention.zigzag import ZigzagBlock, zigzag_block, zigzag_positions


class _Transfer:
    """A posted shift round the ring; ``wait()`` returns the received tensor."""

    def __init__(self, works: List[dist.Work], received: Tensor):
        self._works = works
        self._received = received

    def wait(self) -> Tensor:
        for work in self._works:
            work.wait()
        return self._received


class _Ring:
    """This rank's place in the ring: it sends to ``rank + 1`` and receives from ``rank - 1``."""

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        if self.size > 1:
            self._next = dist.get_global_rank(group, (self.rank + 1) % self.size)
            self._prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def source(self, step: int) -> int:
        """The rank whose k/v shard this rank holds at ``step``."""
        return (self.rank - step) % self.size

    def shift(self, tensor: Tensor) -> _Transfer:
        """Post: send ``tensor`` (contiguous) to the next rank, receive the previous rank's."""
        if self.size == 1:
            return _Transfer([], tensor)
        received = torch.empty_like(tensor)
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, self._next, self.group),
            dist.P2POp(dist.irecv, received, self._prev, self.group),
        ])
        return _Transfer(works, received)


@dataclass(frozen=True)
class RingDropout:
    """The attention dropout of one ring call: probability ``p`` and the seed of its masks."""

    p: float
    seed: int

    def keep(self, q: Tensor, kv: Tensor, ring: _Ring, step: int, block: ZigzagBlock) -> Tensor:
        """The bool keep mask ``[b, h, rows, cols]`` of ``block`` at ring ``step``."""
        rows = zigzag_positions(ring.rank, ring.size, q.shape[0], q.device)[block.q_rows]
        source = ring.source(step)
        cols = zigzag_positions(source, ring.size, kv.shape[1], q.device)[block.kv_rows]
        return keep_mask(self.seed, q.shape[1], q.shape[2], rows, cols, self.p)


def forward_step(
    q: Tensor, kv: Tensor, block: ZigzagBlock, softmax_scale: float,
    out: Optional[Tensor], lse: Optional[Tensor], kernel: str = "auto",
    keep: Optional[Tensor] = None, dropout_p: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """One ring step without communication: attend ``block``'s rows of q ``[s, b, h, d]`` to
    kv ``[2, s', b, g, d]`` and merge into the running fp32 ``out`` ``[s, b, h, d]`` and ``lse``
    ``[s, b, h]``. On the first step (the diagonal block, every row) pass ``out = lse = None``.
    ``kernel``: the block kernel (``block_kernel.KERNEL_CHOICES``); ``keep``: the block's
    dropout mask (``RingDropout.keep``), if any.
    """
    rows, cols = block.q_rows, block.kv_rows
    block_out, block_lse = block_attention_forward(
        q[rows], kv[0, cols], kv[1, cols], block.causal, softmax_scale, kernel, keep, dropout_p
    )
    if out is None:
        return block_out.float(), block_lse
    merge_block_(out[rows], lse[rows], block_out, block_lse)
    return out, lse


def backward_step(
    dout: Tensor, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, block: ZigzagBlock,
    softmax_scale: float, dq: Tensor, kernel: str = "auto",
    keep: Optional[Tensor] = None, dropout_p: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """One backward ring step without communication: add the block's query gradient into the
    fp32 ``dq`` ``[s, b, h, d]`` and return its key/value gradients for ``block.kv_rows``."""
    rows, cols = block.q_rows, block.kv_rows
    dq_block, dk, dv = block_attention_backward(
        dout[rows], q[rows], kv[0, cols], kv[1, cols], out[rows], lse[rows], block.causal,
        softmax_scale, kernel, keep, dropout_p,
    )
    dq[rows].add_(dq_block)
    return dk, dv


def _dropout_args(
    dropout: Optional[RingDropout], q: Tensor, kv: Tensor, ring: _Ring, step: int,
    block: ZigzagBlock,
) -> Tuple[Optional[Tensor], float]:
    """``(keep, p)`` for a step: the block's mask, or ``(None, 0.0)`` without dropout."""
    if dropout is None:
        return None, 0.0
    return dropout.keep(q, kv, ring, step, block), dropout.p


def _ring_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float, ring: _Ring,
    kernel: str, dropout: Optional[RingDropout] = None,
) -> Tuple[Tensor, Tensor]:
    """-> out ``[s, b, h, d]`` in q's dtype, lse ``[s, b, h]`` fp32."""
    kv = torch.stack((k, v))  # one contiguous message per step
    out = lse = None
    for step in range(ring.size):
        incoming = ring.shift(kv) if step + 1 < ring.size else None
        block = zigzag_block(ring.rank, ring.source(step), q.shape[0], causal)
        keep, p = _dropout_args(dropout, q, kv, ring, step, block)
        out, lse = forward_step(q, kv, block, softmax_scale, out, lse, kernel, keep, p)
        if incoming is not None:
            kv = incoming.wait()
    return out.to(q.dtype), lse


def _ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
    softmax_scale: float, ring: _Ring, kernel: str, dropout: Optional[RingDropout] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv in the inputs' dtypes."""
    kv = torch.stack((k, v))
    dq = torch.zeros_like(q, dtype=torch.float32)
    grads_in = None  # the accumulator of the shard held now, travelling one step behind it
    for step in range(ring.size):
        incoming = ring.shift(kv) if step + 1 < ring.size else None
        block = zigzag_block(ring.rank, ring.source(step), q.shape[0], causal)
        keep, p = _dropout_args(dropout, q, kv, ring, step, block)
        dk, dv = backward_step(dout, q, kv, out, lse, block, softmax_scale, dq, kernel, keep, p)
        dkv = torch.zeros_like(kv, dtype=torch.float32) if grads_in is None else grads_in.wait()
        dkv[0, block.kv_rows].add_(dk)
        dkv[1, block.kv_rows].add_(dv)
        grads_in = ring.shift(dkv)  # after the last step this delivers every shard to its owner
        if incoming is not None:
            kv = incoming.wait()
    dkv = grads_in.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    """Autograd wrapper: the backward is the ring pass of ``_ring_backward``."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float, ring: _Ring, kernel: str,
                dropout: Optional[RingDropout]):
        out, lse = _ring_forward(q, k, v, causal, softmax_scale, ring, kernel, dropout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.ring = causal, softmax_scale, ring
        ctx.kernel, ctx.dropout = kernel, dropout
        return out

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = _ring_backward(
            dout, *ctx.saved_tensors, ctx.causal, ctx.softmax_scale, ctx.ring, ctx.kernel,
            ctx.dropout,
        )
        return dq, dk, dv, None, None, None, None, None


def _default_group() -> Optional[dist.ProcessGroup]:
    """Megatron's context-parallel group; ``None`` (one rank) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state  # only here: the ring itself needs no megatron

    group = parallel_state.get_context_parallel_group(check_initialized=False)
    if group is None:
        raise ValueError(
            "ring_attention needs a process group: pass group=, or initialize megatron's "
            "context-parallel group with "
            "megatron.core.parallel_state.initialize_model_parallel(context_parallel_size=R)"
        )
    return group


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
    kernel: str = "auto",
    dropout_p: float = 0.0,
) -> Tensor:
    """Exact attention of zigzag-sharded q ``[s_local, b, h, d]`` to k, v ``[s_local, b, g, d]``
    over the ranks of ``group`` (default: Megatron's context-parallel group) ->
    ``[s_local, b, h, d]``.

    Rank ``r`` of ``R`` holds chunks ``r`` and ``2R-1-r`` of ``2R`` (``zigzag_shard``; Megatron's
    ``get_batch_on_this_cp_rank``). ``softmax_scale`` defaults to ``d ** -0.5``. ``kernel``
    picks the block kernel (``block_kernel.KERNEL_CHOICES``: ``auto``, ``torch``, ``flash_attn``,
    ``cudnn``, ``math``);
    every rank must resolve it alike. ``dropout_p > 0`` drops attention probabilities with
    position-keyed masks whose seed is drawn here from the default generator (call it inside
    Megatron's RNG-tracker fork) and runs the ``math`` kernel. Differentiable in q, k and v.
    """
    check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and kernel not in ("auto", "math"):
        raise ValueError(
            f"attention dropout runs the 'math' block kernel (the flash kernels here carry no "
            f"dropout RNG state to their backward); got kernel {kernel!r}"
        )
    kernel = select_kernel(q, "math" if dropout_p > 0 else kernel)
    ring = _Ring(_default_group() if group is None else group)
    if causal and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"causal ring attention is self-attention: local q length {q.shape[0]} must equal "
            f"local k/v length {k.shape[0]}"
        )
    if causal and ring.size > 1 and q.shape[0] % 2:
        raise ValueError(
            f"causal ring attention needs zigzag shards of two equal chunks: local length "
            f"{q.shape[0]} is odd (the full sequence must be divisible by 2 x {ring.size})"
        )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    dropout = RingDropout(dropout_p, draw_seed(q.device)) if dropout_p > 0 else None
    return RingAttention.apply(q, k, v, causal, scale, ring, kernel, dropout)

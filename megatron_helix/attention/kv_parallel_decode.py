"""KV-parallel attention with a static KV cache: the slice group holds the cache by sequence.

The ``m`` ranks of a slice group hold the same heads (``H/n`` query, ``G/n`` key/value heads),
each ``d/m`` of their dims. For inference they instead share the *tokens* of the cache, block
cyclically: token ``t`` lives on slice rank ``t % m`` at local index ``t // m``, with the full
head dim ``d``, so a rank caches ``[ceil(max_seq/m), b, G/n, d]`` per layer and nothing is
duplicated. Block-cyclic rather than contiguous blocks: at any context length the ranks hold
the same number of tokens (to within one), so every decode step's local attention is equally
long on all of them and new tokens are written round-robin, instead of one rank doing all the
work while the ranks of later blocks wait, empty, for the context to reach them.

One forward of ``sq`` new tokens (prefill or decode alike):

1. ``gather_head_dims``: the new tokens' q, k, v slices all-gathered inside the slice group and
   placed at their dims (``HelixLayout.slice_dims``), giving whole heads; the caller applies
   RoPE to them there, on the full dims, as one device does.
2. ``write_cache``: each new token's k and v go to the cache of the rank that owns its position.
3. ``local_attention``: all new queries attend the rank's cached tokens under the causal mask
   by *global* position, giving a partial output and the fp32 log-sum-exp of every query row.
   (``HelixSelfAttention`` refuses a forward of several tokens after the prefill, which
   megatron-core's static path attends without a mask.)
4. ``combine``: the LSEs are all-gathered (``m`` fp32 per row), each partial output is scaled
   by ``exp(lse_j - lse_total)``, and a reduce-scatter along the head dim sums them and hands
   each rank the ``d/m`` output dims of its slice, the input of Megatron's row-parallel
   ``linear_proj``.

Per layer and forward each rank sends ``(m-1) sq b [(H/n + 2G/n) d/m e + 4 H/n + H/n d/m e]``
bytes (``decode_mode.kv_parallel_bytes_sent``), independent of the context length.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_helix.collectives import all_gather_stacked

_NEG_INF = float("-inf")


def allocate_cache(
    max_sequence_length: int, max_batch_size: int, m: int, kv_heads: int, head_dim: int,
    like: Tensor,
) -> Tuple[Tensor, Tensor]:
    """Key and value caches ``[ceil(max_seq/m), max_batch, G/n, d]`` of ``like``'s dtype and
    device; only written entries are ever read."""
    rows = -(-max_sequence_length // m)
    shape = (rows, max_batch_size, kv_heads, head_dim)
    return like.new_empty(shape), like.new_empty(shape)


def gather_head_dims(x: Tensor, dim_order: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``[s, b, h, d/m]`` (this rank's dims) -> ``[s, b, h, d]`` (every dim at its place).

    ``dim_order`` ``[d]``: the head dims in slice order, ``slice_dims(0) + slice_dims(1) + ...``.
    """
    stacked = all_gather_stacked(x, group)  # [m, s, b, h, d/m]
    in_slice_order = stacked.permute(1, 2, 3, 0, 4).flatten(-2)
    return in_slice_order.index_select(-1, torch.argsort(dim_order))


def _owned(start: int, end: int, m: int, rank: int) -> range:
    """Global positions in ``[start, end)`` that slice rank ``rank`` owns (``t % m == rank``)."""
    return range(start + (rank - start) % m, end, m)


def write_cache(
    cache: Tuple[Tensor, Tensor], key: Tensor, value: Tensor, offset: int, batch_start: int,
    m: int, rank: int,
) -> None:
    """Store the new tokens' ``key``/``value`` ``[sq, b, G/n, d]`` (positions ``offset`` on)
    that this rank owns at their local indices ``t // m``, batch rows from ``batch_start``."""
    sq, b = key.shape[:2]
    owned = _owned(offset, offset + sq, m, rank)
    if not owned:
        return
    rows = slice(owned.start // m, owned.start // m + len(owned))
    batch = slice(batch_start, batch_start + b)
    first = owned.start - offset
    cache[0][rows, batch] = key[first::m]
    cache[1][rows, batch] = value[first::m]


def local_attention(
    query: Tensor, cache: Tuple[Tensor, Tensor], offset: int, batch_start: int, m: int, rank: int,
    scale: float,
) -> Tuple[Tensor, Tensor]:
    """New queries ``[sq, b, H/n, d]`` (positions ``offset`` on) over this rank's cached tokens
    up to the last new position, masked causally by global position (this rank's local index
    ``i`` is position ``rank + i m``).

    Returns the partial output ``[sq, b, H/n, d]`` fp32, normalized over this rank's keys, and
    its log-sum-exp ``[b, H/n, sq]`` fp32 (``-inf`` for rows that see none of them).
    """
    sq, b, h, d = query.shape
    end = offset + sq
    held = len(_owned(0, end, m, rank))
    batch = slice(batch_start, batch_start + b)
    key = cache[0][:held, batch].permute(1, 2, 0, 3).float()  # [b, g, sk, d]
    value = cache[1][:held, batch].permute(1, 2, 0, 3).float()
    g = key.shape[1]
    q = query.permute(1, 2, 0, 3).reshape(b, g, h // g * sq, d).float()
    scores = torch.matmul(q, key.transpose(-1, -2)).view(b, g, h // g, sq, held) * scale
    key_positions = torch.arange(held, device=query.device) * m + rank
    query_positions = torch.arange(offset, end, device=query.device).unsqueeze(1)
    scores = scores.masked_fill(key_positions > query_positions, _NEG_INF)
    lse = torch.logsumexp(scores, dim=-1) if held else scores.new_full(scores.shape[:-1], _NEG_INF)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    out = torch.matmul(probs.view(b, g, h // g * sq, held), value)
    out = out.view(b, h, sq, d).permute(2, 0, 1, 3)
    return out, lse.view(b, h, sq)


def combine(
    out: Tensor, lse: Tensor, dim_order: Tensor, group: dist.ProcessGroup, dtype: torch.dtype,
) -> Tensor:
    """Partial outputs ``[sq, b, H/n, d]`` fp32 and their LSEs ``[b, H/n, sq]`` of the slice
    group -> this rank's ``d/m`` dims of the exact output ``[sq, b, H/n, d/m]`` in ``dtype``.

    The reduce-scatter sums in ``dtype`` (the activations'), so what crosses the group is
    ``1/m`` of the output per rank at the activation width.
    """
    sq, b, h, d = out.shape
    m = dist.get_world_size(group)
    lses = all_gather_stacked(lse.contiguous(), group)  # [m, b, H/n, sq]
    weight = torch.exp(lse - torch.logsumexp(lses, dim=0))  # 0 where this rank saw no key
    scaled = out * weight.permute(2, 0, 1).unsqueeze(-1)
    # slot j: the dims of slice j, [m, sq, b, H/n, d/m]
    send = scaled.index_select(-1, dim_order).view(sq, b, h, m, d // m).permute(3, 0, 1, 2, 4)
    mine = out.new_empty((sq, b, h, d // m), dtype=dtype)
    dist.reduce_scatter_tensor(mine, send.to(dtype).flatten(0, 1).contiguous(), group=group)
    return mine


def kv_parallel_attention(
    query: Tensor, key: Tensor, value: Tensor, cache: Tuple[Tensor, Tensor], offset: int,
    batch_start: int, scale: float, dim_order: Tensor, group: dist.ProcessGroup,
) -> Tensor:
    """Steps 2-4 for whole-head, rotated ``query`` ``[sq, b, H/n, d]`` and ``key``/``value``
    ``[sq, b, G/n, d]`` of positions ``offset`` on: the new tokens enter the cache and the
    result is this rank's ``d/m`` dims of the attention output ``[sq, b, H/n, d/m]``."""
    m, rank = dist.get_world_size(group), dist.get_rank(group)
    write_cache(cache, key, value, offset, batch_start, m, rank)
    out, lse = local_attention(query, cache, offset, batch_start, m, rank, scale)
    return combine(out, lse, dim_order, group, query.dtype)

"""The zigzag sequence layout of ring attention, and which block pairs causal attention needs.

With ``R`` ranks the sequence is cut into ``2R`` equal chunks and rank ``r`` holds chunks ``r``
and ``2R-1-r``, in that order: one early and one late chunk, so under a causal mask every rank
owns the same number of visible (query, key) pairs. This is the layout Megatron's
``megatron.core.utils.get_batch_on_this_cp_rank`` produces, so data loading, loss and gradient
reduction stay Megatron's.

``zigzag_block`` is the causal geometry the ring uses to skip work: for the queries of one rank
and the keys of another it says which rows are needed, so nothing is computed and then masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch import Tensor


def zigzag_chunks(rank: int, ring_size: int) -> Tuple[int, int]:
    """The two of the ``2 * ring_size`` chunks that ``rank`` holds, early one first."""
    return rank, 2 * ring_size - 1 - rank


def check_zigzag_length(seq_len: int, ring_size: int) -> None:
    """Raise ``ValueError`` unless ``seq_len`` splits into ``2 * ring_size`` equal chunks."""
    if ring_size < 1:
        raise ValueError(f"ring size must be >= 1, got {ring_size}")
    chunks = 2 * ring_size
    if seq_len % chunks:
        lower = seq_len - seq_len % chunks
        raise ValueError(
            f"the zigzag layout cuts the sequence into 2 x ring size = {chunks} equal chunks: "
            f"sequence length {seq_len} is not divisible by {chunks} (nearest valid lengths: "
            f"{lower or chunks} and {lower + chunks})"
        )


def zigzag_shard(x: Tensor, rank: int, ring_size: int, dim: int = 0) -> Tensor:
    """Rank ``rank``'s shard of the full tensor ``x``: chunks ``rank`` and ``2R-1-rank`` of
    ``dim`` concatenated, so the shard has ``x.shape[dim] / R`` positions."""
    check_zigzag_length(x.shape[dim], ring_size)
    chunks = x.chunk(2 * ring_size, dim)
    early, late = zigzag_chunks(rank, ring_size)
    return torch.cat((chunks[early], chunks[late]), dim)


def zigzag_positions(rank: int, ring_size: int, local_len: int, device=None) -> Tensor:
    """The global sequence positions (int64 ``[local_len]``) of rank ``rank``'s zigzag shard."""
    half = local_len // 2
    early, late = zigzag_chunks(rank, ring_size)
    if ring_size == 1:
        return torch.arange(local_len, device=device)
    return torch.cat((torch.arange(early * half, (early + 1) * half, device=device),
                      torch.arange(late * half, (late + 1) * half, device=device)))


def zigzag_unshard(shards: Sequence[Tensor], dim: int = 0) -> Tensor:
    """Inverse of ``zigzag_shard``: the full tensor from every rank's shard, in rank order."""
    ring_size = len(shards)
    shapes = {tuple(shard.shape) for shard in shards}
    if len(shapes) != 1 or shards[0].shape[dim] % 2:
        raise ValueError(
            f"zigzag shards must share one shape with an even length along dim {dim} (two equal "
            f"chunks); got shapes {sorted(shapes)}"
        )
    chunks = [None] * (2 * ring_size)
    for rank, shard in enumerate(shards):
        early, late = zigzag_chunks(rank, ring_size)
        chunks[early], chunks[late] = shard.chunk(2, dim)
    return torch.cat(chunks, dim)


@dataclass(frozen=True)
class ZigzagBlock:
    """The rows of a query shard and of a key/value shard that attend each other.

    ``causal`` marks the diagonal block (a rank's own keys), where the plain causal mask over
    the shard's ``2c`` positions is exact because its two chunks are in sequence order.
    """

    q_rows: slice
    kv_rows: slice
    causal: bool


def zigzag_block(rank: int, source: int, local_len: int, causal: bool) -> ZigzagBlock:
    """What rank ``rank``'s queries need of rank ``source``'s keys, both zigzag shards of
    ``local_len = 2c`` positions.

    Without a mask: all of it (the key shard may then have another length). Causal, own keys:
    the diagonal block. Causal, ``source < rank``: the source's early chunk precedes both of my
    chunks and its late chunk follows both, so all my queries see exactly its first half.
    ``source > rank``: my early chunk precedes both of its chunks, while my late chunk follows
    both, so only my second half of queries attends, to its whole shard. Either way ``c x 2c``
    pairs, all visible: every rank does the same work at every step.
    """
    everything = slice(None)
    if not causal or source == rank:
        return ZigzagBlock(everything, everything, causal)
    if local_len % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks; got {local_len} positions")
    half = local_len // 2
    if source < rank:
        return ZigzagBlock(everything, slice(0, half), False)
    return ZigzagBlock(slice(half, local_len), everything, False)

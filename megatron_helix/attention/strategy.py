"""Choosing between the two exact helix score strategies from the shapes.

Both strategies give the same result; they differ in what crosses the slice group. The byte
counts below are what each rank *sends* per attention layer (ring all-reduce: ``2(m-1)/m`` of
the buffer; all-gather: ``m-1`` local shards; all-to-all: ``(m-1)/m`` of the buffer) and are the
same formulas the communication tests check against measured traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Tuple

STRATEGIES = ("auto", "allreduce", "redistribute")


@dataclass(frozen=True)
class SliceGroupShape:
    """One rank's attention shapes inside a slice group of ``m`` ranks.

    ``heads``/``kv_heads`` are this rank's (``H/n``, ``G/n``); ``slice_dim`` is ``d/m``;
    ``element_bytes`` is the activation dtype size (scores always travel in fp32).
    """

    m: int
    batch: int
    seq_q: int
    seq_kv: int
    heads: int
    kv_heads: int
    slice_dim: int
    element_bytes: int


QUERY_BLOCK_SIZE = 512  # the score all-reduce's default query block (HelixCoreAttention's)


def query_blocks(
    seq_q: int, seq_kv: int, causal: bool, query_block_size: int = QUERY_BLOCK_SIZE
) -> Iterator[Tuple[int, int, int]]:
    """``(q0, q1, k1)`` of every query block of the score all-reduce: rows ``q0:q1`` see keys
    ``0:k1``, all keys without a mask, up to the block's last row under a causal mask aligned
    bottom-right (``seq_kv - seq_q`` leading keys always visible). Blocks that see no key are
    left out."""
    for q0 in range(0, seq_q, query_block_size):
        q1 = min(q0 + query_block_size, seq_q)
        k1 = min(seq_kv, seq_kv - seq_q + q1) if causal else seq_kv
        if k1 > 0:
            yield q0, q1, k1


def allreduce_bytes_sent(
    shape: SliceGroupShape, backward: bool, causal: bool,
    query_block_size: int = QUERY_BLOCK_SIZE,
) -> int:
    """Score all-reduce, one per query block over the scores that block computes: fp32 scores
    forward; recomputed scores + dP backward."""
    if shape.m == 1:
        return 0
    per_pass = 0
    for q0, q1, k1 in query_blocks(shape.seq_q, shape.seq_kv, causal, query_block_size):
        scores = shape.batch * shape.heads * (q1 - q0) * k1 * 4
        per_pass += 2 * (shape.m - 1) * scores // shape.m
    return per_pass * (3 if backward else 1)


def redistribute_bytes_sent(shape: SliceGroupShape, backward: bool) -> int:
    """Redistribute: q and output all-to-all, k and v all-gather; mirrored in backward."""
    m = shape.m
    if m == 1:
        return 0
    token_dims = shape.batch * shape.seq_q * shape.slice_dim * shape.element_bytes
    q_or_out = shape.heads * token_dims * (m - 1) // m
    k_or_v = shape.kv_heads * token_dims * (m - 1)
    forward = 2 * q_or_out + 2 * k_or_v
    return forward * (2 if backward else 1)


def redistribute_applies(shape: SliceGroupShape) -> bool:
    """Redistribute needs self-attention (``sq == sk``) dealt in ``2m`` equal chunks."""
    return shape.seq_q == shape.seq_kv and shape.seq_q % (2 * shape.m) == 0


def choose_strategy(
    requested: str, shape: SliceGroupShape, backward: bool, causal: bool,
    query_block_size: int = QUERY_BLOCK_SIZE,
) -> str:
    """Resolve ``auto`` to the strategy that sends fewer bytes; validate explicit choices."""
    if requested not in STRATEGIES:
        raise ValueError(f"--helix-score-strategy {requested!r} not in {STRATEGIES}")
    if requested == "redistribute" and not redistribute_applies(shape):
        raise ValueError(
            f"--helix-score-strategy redistribute needs sq == sk divisible by 2*m = {2 * shape.m} "
            f"(got sq={shape.seq_q}, sk={shape.seq_kv}); use allreduce or auto"
        )
    if requested != "auto":
        return requested
    if not redistribute_applies(shape):
        return "allreduce"
    allreduce = allreduce_bytes_sent(shape, backward, causal, query_block_size)
    return "redistribute" if redistribute_bytes_sent(shape, backward) < allreduce else "allreduce"

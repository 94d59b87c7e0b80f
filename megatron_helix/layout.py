"""Helix rank arithmetic: pure functions, no process groups.

A helix group is Megatron's tensor-parallel group of ``P = m * n`` ranks. Rank ``r`` of that
group is the pair ``(g, j) = (r // m, r % m)``: head group ``g`` (one of ``n``) and dim slice
``j`` (one of ``m``). The ``m`` ranks of one head group are contiguous, so the heavy
slice-group traffic stays inside a node when ``m <= 8``.

Each rank owns, for every head of its group, ``d / m`` of the head's ``d`` dims. Which dims is
dictated by RoPE: rotate-half RoPE rotates dim ``i`` together with ``i + d/2``, interleaved RoPE
rotates ``2i`` with ``2i + 1``; a rank must own both members of every pair it touches.

The projections keep Megatron's weight shapes. Only the meaning of the columns (QKV) or rows
(output projection input) changes, which these permutations express: ``full[perm]`` turns the
standard (single-device / TP) layout into the helix layout, after which Megatron's contiguous
tensor-parallel split hands each rank exactly its heads and dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List


class HelixLayoutError(ValueError):
    """A model shape that cannot be partitioned the requested way."""


@dataclass(frozen=True)
class HelixLayout:
    """Head x head-dim partitioning of one attention layer.

    Args:
        m: dim slices per head (``--helix-m``).
        n: head groups (``--helix-n``).
        num_heads: query heads ``H``.
        num_query_groups: key/value heads ``G`` (``G == H`` without GQA).
        head_dim: ``d`` (Megatron's ``kv_channels``).
        rope_pairing: which dims RoPE rotates together: ``"rotate_half"`` (``i`` with
            ``i + d/2``, Megatron's default), ``"interleaved"`` (``2i`` with ``2i+1``,
            ``--rotary-interleaved``) or ``"none"`` (no RoPE: any contiguous slice works).
    """

    m: int
    n: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    rope_pairing: str = "rotate_half"

    def __post_init__(self) -> None:
        for error in layout_errors(
            self.m, self.n, self.num_heads, self.num_query_groups, self.head_dim, self.rope_pairing
        ):
            raise HelixLayoutError(error)

    @property
    def size(self) -> int:
        """Ranks in the helix (tensor-parallel) group."""
        return self.m * self.n

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.n

    @property
    def query_groups_per_group(self) -> int:
        return self.num_query_groups // self.n

    @property
    def slice_dim(self) -> int:
        return self.head_dim // self.m

    def coords(self, rank: int) -> tuple[int, int]:
        """Helix rank -> ``(head group, dim slice)``."""
        if not 0 <= rank < self.size:
            raise HelixLayoutError(f"helix rank {rank} outside [0, {self.size})")
        return rank // self.m, rank % self.m

    def rank(self, head_group: int, dim_slice: int) -> int:
        """``(head group, dim slice)`` -> helix rank."""
        return head_group * self.m + dim_slice

    def slice_dims(self, dim_slice: int) -> List[int]:
        """The head dims owned by ``dim_slice``, in the order the rank stores them."""
        return slice_dims(self.head_dim, self.m, dim_slice, self.rope_pairing)

    def heads(self, head_group: int) -> List[int]:
        """Query heads of ``head_group``."""
        h = self.heads_per_group
        return list(range(head_group * h, (head_group + 1) * h))

    def qkv_row_permutation(self) -> List[int]:
        """Row order turning Megatron's fused QKV weight into the helix layout.

        Megatron stores the fused QKV output (the weight's rows) per KV group as
        ``[q heads of the group (H/G * d), k (d), v (d)]``. The helix layout concatenates,
        rank by rank, the same structure restricted to the rank's KV groups and dims:
        ``[q heads (H/G * d/m), k (d/m), v (d/m)]`` per local KV group. Works for biases too.
        """
        d = self.head_dim
        q_per_kv = self.num_heads // self.num_query_groups
        rows_per_kv_group = (q_per_kv + 2) * d
        perm: List[int] = []
        for rank in range(self.size):
            g, j = self.coords(rank)
            dims = self.slice_dims(j)
            kv_groups = range(g * self.query_groups_per_group, (g + 1) * self.query_groups_per_group)
            for kv in kv_groups:
                for sub_head in range(q_per_kv + 2):  # q heads, then k, then v
                    base = kv * rows_per_kv_group + sub_head * d
                    perm.extend(base + i for i in dims)
        return perm

    def proj_col_permutation(self) -> List[int]:
        """Column order turning the output projection's input dim into the helix layout.

        The core attention output of rank ``(g, j)`` is ``[heads of g] x [dims of j]``
        (head-major); the row-parallel projection's local input columns must match it.
        """
        d = self.head_dim
        perm: List[int] = []
        for rank in range(self.size):
            g, j = self.coords(rank)
            dims = self.slice_dims(j)
            for head in self.heads(g):
                perm.extend(head * d + i for i in dims)
        return perm


ROPE_PAIRINGS = ("rotate_half", "interleaved", "none")
_ROTARY_EMBEDDINGS = ("rope", "yarn")


def rope_pairing(position_embedding_type: str, rotary_interleaved: bool) -> str:
    """The RoPE pairing of a model (Megatron's ``--position-embedding-type``,
    ``--rotary-interleaved``): it decides which head dims a slice may own."""
    if position_embedding_type not in _ROTARY_EMBEDDINGS:
        return "none"
    return "interleaved" if rotary_interleaved else "rotate_half"


def slice_dims(head_dim: int, m: int, dim_slice: int, rope_pairing: str) -> List[int]:
    """Head dims owned by ``dim_slice`` of ``m``.

    Rotate-half RoPE pairs ``i`` with ``i + d/2``: slice ``j`` owns
    ``[j*d/2m, (j+1)*d/2m) + [d/2 + j*d/2m, d/2 + (j+1)*d/2m)``, so the local tensor is again a
    rotate-half layout of width ``d/m`` (local dim ``i`` pairs with ``i + d/2m``) and Megatron's
    RoPE kernels apply unchanged to the local slice with the frequencies indexed the same way.
    Interleaved RoPE pairs ``(2i, 2i+1)`` and no RoPE at all: contiguous slices of ``d/m``.
    """
    if rope_pairing not in ROPE_PAIRINGS:
        raise HelixLayoutError(f"rope_pairing {rope_pairing!r} not in {ROPE_PAIRINGS}")
    if rope_pairing != "rotate_half":
        width = head_dim // m
        return list(range(dim_slice * width, (dim_slice + 1) * width))
    half, width = head_dim // 2, head_dim // (2 * m)
    first = list(range(dim_slice * width, (dim_slice + 1) * width))
    return first + [half + i for i in first]


def inverse_permutation(perm: List[int]) -> List[int]:
    """``inv[perm[i]] = i``: undoes ``x[perm]``."""
    inv = [0] * len(perm)
    for position, source in enumerate(perm):
        inv[source] = position
    return inv


def layout_errors(
    m: int,
    n: int,
    num_heads: int,
    num_query_groups: int,
    head_dim: int,
    rope_pairing: str = "rotate_half",
) -> List[str]:
    """Every reason ``(m, n)`` cannot partition this attention, each with a layout that works.

    Returned rather than raised so argument validation can report all problems at once.
    With RoPE, pairs must stay on one rank, so ``head_dim`` must divide by ``2m`` (rotate-half:
    each half is cut ``m`` ways; interleaved: ``d/m`` must hold whole pairs); without RoPE
    ``head_dim % m == 0`` is enough.
    """
    errors: List[str] = []
    if m < 1 or n < 1:
        return [f"--helix-m ({m}) and --helix-n ({n}) must be >= 1"]
    if num_heads % n:
        errors.append(
            f"--helix-n {n} must divide --num-attention-heads {num_heads} "
            f"(head groups hold whole heads); --helix-n in {_divisors(num_heads)} works"
        )
    if num_query_groups != num_heads and num_query_groups % n:
        errors.append(
            f"--helix-n {n} must divide --num-query-groups {num_query_groups}: a key/value head "
            f"cannot straddle two head groups without replicating it; --helix-n in "
            f"{_divisors(num_query_groups)} works (put the remaining ranks into --helix-m)"
        )
    if num_query_groups and num_heads % num_query_groups:
        errors.append(
            f"--num-attention-heads {num_heads} must be a multiple of "
            f"--num-query-groups {num_query_groups}"
        )
    if rope_pairing not in ROPE_PAIRINGS:
        errors.append(f"rope pairing {rope_pairing!r} is not one of {ROPE_PAIRINGS}")
    elif rope_pairing == "none":
        if head_dim % m:
            errors.append(
                f"--helix-m {m} must divide the head dim {head_dim} (--kv-channels); "
                f"--helix-m in {_divisors(head_dim)} works"
            )
    elif head_dim % (2 * m):
        style = rope_pairing.replace("_", "-")
        ok = [k for k in _divisors(head_dim) if head_dim % (2 * k) == 0]
        errors.append(
            f"--helix-m {m}: with {style} RoPE the head dim {head_dim} (--kv-channels) must be "
            f"divisible by 2*m = {2 * m} so every RoPE pair stays on one rank; "
            f"--helix-m in {ok} works"
        )
    return errors


def _divisors(value: int) -> List[int]:
    return [k for k in range(1, value + 1) if value % k == 0]

"""The parallel sizes of a helix job, validated on construction, before any process group exists.

A job is ``world = (m * n) * cp * pp * dp`` ranks: the helix group of ``m * n`` ranks is
Megatron's tensor-parallel group, the ring is Megatron's context-parallel group, and pipeline
and data parallelism are Megatron's own. ``HelixParallelDims(...)`` raises on impossible sizes,
so an instance always holds a layout that runs and ``dp`` is exact. Every check collects all
the reasons at once, each naming the flag, the numbers and a value that would work, so a user
sees all of them together and every rank fails the same way before any collective can hang.

``size_errors`` and ``model_errors`` are the two checks as lists, for callers (the argument
parser, the planner) that gather problems from several sources before raising once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megatron_helix.layout import layout_errors


class HelixConfigError(ValueError):
    """An impossible parallel layout; the message lists every problem found."""


def _raise_if(problems: List[str]) -> None:
    if problems:
        raise HelixConfigError("impossible helix layout:\n  - " + "\n  - ".join(problems))


def size_errors(world_size: int, m: int = 1, n: int = 1, ring: int = 1, pp: int = 1) -> List[str]:
    """Every reason ``world_size`` ranks cannot hold helix ``m x n`` x ring x pipeline."""
    problems = [
        f"{flag} must be >= 1, got {value}"
        for flag, value in (
            ("--helix-m", m), ("--helix-n", n), ("--helix-ring-size", ring),
            ("--pipeline-model-parallel-size", pp), ("the world size", world_size),
        )
        if value < 1
    ]
    if problems:
        return problems
    model_parallel = m * n * ring * pp
    if world_size % model_parallel:
        fits = [k for k in range(1, world_size + 1) if world_size % k == 0]
        problems.append(
            f"world size {world_size} is not divisible by --helix-m {m} x --helix-n {n} x "
            f"--helix-ring-size {ring} x --pipeline-model-parallel-size {pp} = {model_parallel}; "
            f"the product must divide the world size, i.e. be one of {fits}"
        )
    return problems


def model_errors(
    m: int,
    n: int,
    ring: int,
    num_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
    head_dim: Optional[int] = None,
    rope_pairing: str = "rotate_half",
    seq_length: Optional[int] = None,
) -> List[str]:
    """Every reason the attention shape cannot be split ``m x n`` on a ring of ``ring``.

    Shape arguments left as None are not checked (the parser may not know them yet).
    """
    problems: List[str] = []
    if num_heads is not None and head_dim is not None:
        problems += layout_errors(m, n, num_heads, num_query_groups or num_heads, head_dim,
                                  rope_pairing)
    if seq_length is not None and ring > 1 and seq_length % (2 * ring):
        problems.append(
            f"--seq-length {seq_length} must be divisible by 2 x --helix-ring-size "
            f"= {2 * ring} (the zigzag layout cuts the sequence into 2R chunks)"
        )
    return problems


@dataclass(frozen=True)
class HelixParallelDims:
    """Helix ``m x n``, ring (context-parallel) size and pipeline size on ``world_size`` ranks.

    Raises ``HelixConfigError`` on construction when the sizes cannot hold together.
    """

    world_size: int
    m: int = 1
    n: int = 1
    ring: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        _raise_if(size_errors(self.world_size, self.m, self.n, self.ring, self.pp))

    @property
    def helix(self) -> int:
        """Ranks in one helix group (Megatron's tensor-parallel size)."""
        return self.m * self.n

    @property
    def dp(self) -> int:
        """Data-parallel size: the world divided by every model-parallel size (exact)."""
        return self.world_size // (self.helix * self.ring * self.pp)

    def check_model(self, **shape) -> "HelixParallelDims":
        """Raise ``HelixConfigError`` unless these sizes split the attention ``shape``
        (``model_errors``' keyword arguments); return self when they do."""
        _raise_if(model_errors(self.m, self.n, self.ring, **shape))
        return self

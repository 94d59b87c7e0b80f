"""The parallel sizes of a helix job, validated before any process group exists.

A job is ``world = (m * n) * cp * pp * dp`` ranks: the helix group of ``m * n`` ranks is
Megatron's tensor-parallel group, the ring is Megatron's context-parallel group, and pipeline
and data parallelism are Megatron's own. ``HelixParallelDims.validate`` collects every reason a
layout is impossible, each naming the flag, the numbers and a value that would work, so a user
sees all of them at once and every rank fails the same way before any collective can hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megatron_helix.layout import HelixLayout, layout_errors


class HelixConfigError(ValueError):
    """An impossible parallel layout; the message lists every problem found."""


@dataclass(frozen=True)
class HelixParallelDims:
    """Helix ``m x n``, ring (context-parallel) size and pipeline size on ``world_size`` ranks."""

    world_size: int
    m: int = 1
    n: int = 1
    ring: int = 1
    pp: int = 1

    @property
    def helix(self) -> int:
        """Ranks in one helix group (Megatron's tensor-parallel size)."""
        return self.m * self.n

    @property
    def dp(self) -> int:
        return self.world_size // (self.helix * self.ring * self.pp)

    def errors(
        self,
        num_heads: Optional[int] = None,
        num_query_groups: Optional[int] = None,
        head_dim: Optional[int] = None,
        rope_pairing: str = "rotate_half",
        seq_length: Optional[int] = None,
    ) -> List[str]:
        """Every problem with these sizes (and, when given, with this model shape)."""
        problems: List[str] = []
        for flag, value in (
            ("--helix-m", self.m), ("--helix-n", self.n), ("--helix-ring-size", self.ring),
            ("--pipeline-model-parallel-size", self.pp),
        ):
            if value < 1:
                problems.append(f"{flag} must be >= 1, got {value}")
        if problems:
            return problems
        model_parallel = self.helix * self.ring * self.pp
        if self.world_size % model_parallel:
            fits = [k for k in range(1, self.world_size + 1) if self.world_size % k == 0]
            problems.append(
                f"world size {self.world_size} is not divisible by --helix-m {self.m} x "
                f"--helix-n {self.n} x --helix-ring-size {self.ring} x "
                f"--pipeline-model-parallel-size {self.pp} = {model_parallel}; the product must "
                f"divide the world size, i.e. be one of {fits}"
            )
        if num_heads is not None and head_dim is not None:
            problems += layout_errors(
                self.m, self.n, num_heads, num_query_groups or num_heads, head_dim, rope_pairing
            )
        if seq_length is not None and self.ring > 1 and seq_length % (2 * self.ring):
            problems.append(
                f"--seq-length {seq_length} must be divisible by 2 x --helix-ring-size "
                f"= {2 * self.ring} (the zigzag layout cuts the sequence into 2R chunks)"
            )
        return problems

    def validate(self, **model) -> "HelixParallelDims":
        """Raise ``HelixConfigError`` listing every problem; return self when valid."""
        problems = self.errors(**model)
        if problems:
            raise HelixConfigError(
                "impossible helix layout:\n  - " + "\n  - ".join(problems)
            )
        return self

    def attention_layout(
        self, num_heads: int, num_query_groups: int, head_dim: int, rope_pairing: str
    ) -> HelixLayout:
        return HelixLayout(self.m, self.n, num_heads, num_query_groups, head_dim, rope_pairing)

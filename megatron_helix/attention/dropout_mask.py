"""Attention dropout masks that are a function of position, not of the order of the draws.

Ring attention computes one row's probabilities block by block, on whichever rank holds the
keys, in an order that depends on the ring size. A mask drawn from a sequential RNG would
change with the layout and would have to be stored or replayed per block for the backward.
Here the keep decision of entry ``(batch, head, query position, key position)`` is a hash of
those four global coordinates and one seed: any block can rebuild its piece of the mask, in the
forward and again in the backward, and a ring of any size drops exactly the entries one device
drops. The seed is one draw from the caller's RNG (Megatron's RNG tracker, so activation
recomputation and checkpoints replay it).

The hash is the 32-bit integer finalizer ``x = (x ^ x >> 16) * 0x45d9f3b`` (twice, then
``x ^ x >> 16``), applied to the coordinates folded in one at a time; every product stays below
2**63, so int64 tensors compute it identically on CPU and CUDA. ``keep`` is
``hash / 2**32 >= p``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B


def _mix(x: Tensor) -> Tensor:
    """A 32-bit avalanche hash of int64 ``x`` in ``[0, 2**32)``."""
    x = ((x ^ (x >> 16)) * _MULTIPLIER) & _MASK32
    x = ((x ^ (x >> 16)) * _MULTIPLIER) & _MASK32
    return x ^ (x >> 16)


def draw_seed(device: torch.device) -> int:
    """One seed from the default generator of ``device`` (inside an RNG-tracker fork: the
    tracker's stream)."""
    return int(torch.randint(0, 2**31, (1,), device=device).item())


def keep_mask(
    seed: int, batch: int, heads: int, query_positions: Tensor, key_positions: Tensor,
    dropout_p: float,
) -> Tensor:
    """Which attention probabilities survive dropout: bool ``[batch, heads, sq, sk]`` for the
    queries at global ``query_positions`` ``[sq]`` and keys at ``key_positions`` ``[sk]``
    (int64, on the device the mask is wanted on)."""
    device = query_positions.device
    x = _mix(torch.full((), seed & _MASK32, dtype=torch.int64, device=device))
    for coordinate, shape in (
        (torch.arange(batch, device=device), (batch, 1, 1, 1)),
        (torch.arange(heads, device=device), (1, heads, 1, 1)),
        (query_positions, (1, 1, -1, 1)),
        (key_positions, (1, 1, 1, -1)),
    ):
        x = _mix((x + coordinate.view(shape)) & _MASK32)
    return x.to(torch.float64) >= dropout_p * 2**32

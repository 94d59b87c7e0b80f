"""Weights in the standard (single-device / TP) layout <-> the helix layout.

Helix keeps Megatron's parameter shapes; only the order of the fused QKV rows and of the output
projection's input columns differs (``layout.HelixLayout``). These helpers work on *full*
(unsharded) tensors: permute, then Megatron's ordinary contiguous tensor-parallel split hands
every rank its heads and dims (``sharding.py``). A checkpoint written by a helix run can thus
be converted for TP, PP or a single device and back, for any ``(m, n)``.

``standard_layout_factory`` does the same for Megatron's distributed checkpoints: a helix rank
saves its attention weights as pieces of the standard tensors, so the checkpoint is the
standard one.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_helix.layout import HelixLayout, inverse_permutation

QKV_SUFFIXES = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
PROJ_SUFFIX = "self_attention.linear_proj.weight"


def helix_permutation(name: str, layout: HelixLayout) -> Optional[tuple[int, list]]:
    """``(dim, perm)`` that takes a standard-layout full tensor called ``name`` to helix, or None."""
    if name.endswith(QKV_SUFFIXES):
        return 0, layout.qkv_row_permutation()
    if name.endswith(PROJ_SUFFIX):
        return 1, layout.proj_col_permutation()
    return None


def to_helix(name: str, full: torch.Tensor, layout: HelixLayout) -> torch.Tensor:
    """A full standard-layout tensor -> the full helix-layout tensor (others unchanged)."""
    found = helix_permutation(name, layout)
    if found is None:
        return full
    dim, perm = found
    return full.index_select(dim, torch.tensor(perm, device=full.device))


def to_standard(name: str, full: torch.Tensor, layout: HelixLayout) -> torch.Tensor:
    """Inverse of ``to_helix``."""
    found = helix_permutation(name, layout)
    if found is None:
        return full
    dim, perm = found
    inverse = torch.tensor(inverse_permutation(perm), device=full.device)
    return full.index_select(dim, inverse)


def standard_to_helix(state_dict: Dict[str, torch.Tensor], layout: HelixLayout) -> Dict[str, torch.Tensor]:
    """Convert a full (unsharded) standard state dict to the helix layout."""
    return {name: to_helix(name, t, layout) if torch.is_tensor(t) else t
            for name, t in state_dict.items()}


def helix_to_standard(state_dict: Dict[str, torch.Tensor], layout: HelixLayout) -> Dict[str, torch.Tensor]:
    """Convert a full (unsharded) helix state dict back to the standard layout."""
    return {name: to_standard(name, t, layout) if torch.is_tensor(t) else t
            for name, t in state_dict.items()}


def standard_grid(permutation: Sequence[int], local: int) -> int:
    """The chunk size of the regular grid on which every rank's helix rows are standard rows.

    ``permutation[i]`` is the standard index of helix-order row ``i``; rank ``r`` holds helix
    rows ``[r * local, (r + 1) * local)``. The result divides every place where a rank's run of
    consecutive standard rows starts or ends, and every run's standard start, so each chunk of
    that size is one contiguous, aligned piece of the standard tensor (``d / 2m`` rows for
    rotate-half RoPE, ``d / m`` otherwise).
    """
    size = len(permutation)
    grid = math.gcd(size, local)
    for i in range(1, size):
        if i % local == 0 or permutation[i] != permutation[i - 1] + 1:
            grid = math.gcd(grid, math.gcd(i, permutation[i]))
    return grid


def standard_layout_factory(
    sharded: ShardedTensor,
    sharded_offsets: Tuple[Tuple[int, int, int], ...],
    dim: int,
    permutation: Sequence[int],
    rank: int,
) -> ShardedTensorFactory:
    """Describe this rank's helix tensor as pieces of the *standard* (single-device) tensor.

    A distributed checkpoint (``dist_checkpointing``, ``--ckpt-format torch_dist``) then holds
    the same global tensors as one written by one device or plain TP/PP, so any layout, with or
    without helix, loads it. ``sharded`` is Megatron's TP description of the local tensor
    (contiguous blocks in helix order); ``dim`` is its partition dim; ``permutation`` the layout's
    standard index of every helix-order index along ``dim``. Saving writes one ``ShardedTensor``
    per chunk of ``standard_grid``; loading concatenates them back in this rank's order.
    """
    local = sharded.local_shape[dim]
    chunk = standard_grid(permutation, local)
    mine = permutation[rank * local:(rank + 1) * local]
    pieces = [(offset, mine[offset] // chunk) for offset in range(0, local, chunk)]
    axis = dim + len(sharded_offsets)
    fragments = len(permutation) // chunk

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError(
                f"{key}: the distributed optimizer's flattened (dp_reshardable) checkpoint of "
                f"helix attention weights (--helix-m > 1) cannot hold the standard layout; "
                f"save with --dist-ckpt-optim-fully-reshardable (the model-space format)"
            )
        return [
            ShardedTensor.from_rank_offsets(
                key, data.narrow(dim, offset, chunk), *sharded_offsets,
                (axis, index, fragments), replica_id=replica_id,
                prepend_axis_num=len(sharded_offsets),
            )
            for offset, index in pieces
        ]

    def merge(loaded):
        with torch.no_grad():
            return torch.cat(loaded, dim=dim)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)

"""Weights in the standard (single-device / TP) layout <-> the helix layout.

Helix keeps Megatron's parameter shapes; only the order of the fused QKV rows and of the output
projection's input columns differs (``layout.HelixLayout``). These helpers work on *full*
(unsharded) tensors: permute, then Megatron's ordinary contiguous tensor-parallel split hands
every rank its heads and dims (``sharding.py``). A checkpoint written by a helix run can thus
be converted for TP, PP or a single device and back, for any ``(m, n)``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

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

"""Per-head query/key norm when each rank holds only ``d/m`` of a head's ``d`` dims (helix m > 1).

``--qk-layernorm`` (Qwen3, Gemma 3) normalizes every head's ``d``-vector of q and of k. With
the head dims split over the ``m`` ranks of a slice group, each rank sums its dims of every row
(``sum x`` and ``sum x^2`` for LayerNorm, ``sum x^2`` for RMSNorm), in fp32, and one all-reduce
over the slice group completes the statistics of the whole head. The rank then normalizes its
own dims and applies the norm's weight (and bias) at those dims only. The all-reduce is
``torch.distributed.nn.functional``'s, whose backward all-reduces the statistics' gradients
(every rank's statistics depend on every rank's dims), so the input gradient is exact; the
weight gradient is nonzero only at the rank's dims and from the rank's heads, so Megatron's sum
of the q/k-norm weight gradients over the tensor-parallel group (``finalize_model_grads``,
keyed on ``config.qk_layernorm``) gives the one-device gradient.

The norm module is read, not called: its ``weight`` (``[d]``, replicated on every rank, as
Megatron keeps it) and optional ``bias``, with the kind, epsilon and zero-centred gamma taken
from the config as Megatron's norms take them. That covers the local norms
(``torch.nn.LayerNorm`` / ``RMSNorm``, apex ``FusedLayerNorm``) and Transformer Engine's
``TENorm``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor
from torch.distributed.nn.functional import all_reduce

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def _slice_of(param: Optional[Tensor], dims: Tensor, head_dim: int, what: str) -> Optional[Tensor]:
    """``param`` ``[d]`` -> its entries at this rank's dims ``[d/m]`` (None stays None)."""
    if param is None:
        return None
    if param.shape != (head_dim,):
        raise ValueError(
            f"the q/k norm's {what} has shape {tuple(param.shape)}; a head-dim-sliced norm "
            f"needs one entry per head dim, [{head_dim}]"
        )
    return param.index_select(0, dims)


def sliced_head_norm(
    x: Tensor,
    norm: Optional[torch.nn.Module],
    dims: Tensor,
    head_dim: int,
    config: TransformerConfig,
    group: dist.ProcessGroup,
) -> Tensor:
    """Normalize every head over all ``head_dim`` dims, of which this rank holds ``dims``.

    Args:
        x: ``[s, b, heads, d/m]``, this rank's dims of its heads (queries or keys).
        norm: the attention's ``q_layernorm`` / ``k_layernorm``; None or ``IdentityOp``
            returns ``x`` unchanged.
        dims: ``[d/m]`` long, the head dims of ``x``'s last axis, in storage order.
        head_dim: ``d``.
        config: ``normalization`` (``LayerNorm`` or ``RMSNorm``), ``layernorm_epsilon`` and
            ``layernorm_zero_centered_gamma`` (weight applied as ``1 + weight``).
        group: the slice group, the ``m`` ranks holding the other dims of the same heads.

    Returns:
        ``[s, b, heads, d/m]`` in ``x``'s dtype (statistics and affine in fp32).
    """
    if norm is None or isinstance(norm, IdentityOp):
        return x
    kind = config.normalization
    if kind not in NORMALIZATIONS:
        raise ValueError(
            f"--qk-layernorm with --normalization {kind} and --helix-m > 1: a head-dim-sliced "
            f"norm supports {' and '.join(NORMALIZATIONS)}"
        )
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"{type(norm).__name__} as a q/k norm with --helix-m > 1: a head-dim-sliced norm "
            f"needs the module's per-dim weight"
        )
    weight = _slice_of(weight, dims, head_dim, "weight")
    bias = _slice_of(getattr(norm, "bias", None), dims, head_dim, "bias")

    xf = x.float()
    # [s, b, heads, 1 or 2]: this rank's partial sums, then the whole head's.
    if kind == "RMSNorm":
        partial = xf.square().sum(-1, keepdim=True)
    else:
        partial = torch.cat([xf.sum(-1, keepdim=True), xf.square().sum(-1, keepdim=True)], -1)
    total = all_reduce(partial, group=group) if dist.get_world_size(group) > 1 else partial
    if kind == "RMSNorm":
        y = xf * torch.rsqrt(total / head_dim + config.layernorm_epsilon)
    else:
        mean = total[..., :1] / head_dim
        var = (total[..., 1:] / head_dim - mean.square()).clamp_min(0.0)
        y = (xf - mean) * torch.rsqrt(var + config.layernorm_epsilon)
    weight = weight.float()
    if config.layernorm_zero_centered_gamma:
        weight = weight + 1.0
    y = y * weight
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

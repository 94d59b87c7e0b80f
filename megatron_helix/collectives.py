"""Differentiable collectives over an arbitrary process group.

Megatron's mappings are tied to the tensor-parallel group and to sequence-first layouts; helix
needs the same operations inside the slice group. Each op is its own adjoint pair:
all-to-all is undone by the reverse all-to-all, all-gather by reduce-scatter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, unlike empty_like
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Send block ``i`` of dim 0 to rank ``i``; receive rank ``i``'s block into slot ``i``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group), None


class _AllGatherDim0(torch.autograd.Function):
    """Concatenate every rank's tensor along a new leading dim ``[world, *shape]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out.view((world,) + tuple(x.shape))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_tensor(out, grad.contiguous().flatten(0, 1), group=ctx.group)
        return out, None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x``: ``[world, ...]`` -> ``[world, ...]``, slot ``i`` sent to / received from rank ``i``."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, group)


def all_gather_stacked(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x``: ``[...]`` -> ``[world, ...]`` in rank order; gradients are reduce-scattered."""
    if dist.get_world_size(group) == 1:
        return x.unsqueeze(0)
    return _AllGatherDim0.apply(x, group)

"""An all-gather into a new leading dim whose backward reduce-scatters, over any process group.

The redistribute strategy gathers every slice rank's keys and values and each rank attends its
own query tokens to them, so the gradient of rank ``i``'s keys is the sum over the group of
slot ``i`` of every rank's gradient: a reduce-scatter. The library versions do not serve:

- ``torch.distributed.nn.functional.all_gather`` reduce-scatters in its backward only on NCCL;
  on gloo it scatters from the group index taken as a global rank, which fails on every group
  that does not start at global rank 0 (the slice groups of a helix ``n > 1``), and its
  ``_all_gather_base`` refuses non-NCCL backends in the backward;
- Megatron's ``gather_from_sequence_parallel_region`` allocates on
  ``torch.cuda.current_device()``, so it needs a GPU or ``cpu.enable_cpu_execution``.

(The other differentiable collectives helix uses are the libraries': Megatron's
``tensor_parallel.mappings.all_to_all`` and ``torch.distributed.nn.functional.all_reduce``.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherStacked(torch.autograd.Function):
    """``[...]`` -> ``[world, ...]`` by ``all_gather_into_tensor``; ``reduce_scatter_tensor`` back."""

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


def all_gather_stacked(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x``: ``[...]`` -> ``[world, ...]`` in rank order; gradients are reduce-scattered."""
    if dist.get_world_size(group) == 1:
        return x.unsqueeze(0)
    return _AllGatherStacked.apply(x, group)

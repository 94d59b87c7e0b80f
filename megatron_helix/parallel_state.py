"""Helix process groups, built on top of Megatron's ``initialize_model_parallel``.

The helix group *is* Megatron's tensor-parallel group (size ``m * n``), so MLP, embeddings,
MoE, the optimizer and checkpointing treat it as ordinary TP. On top of it this module adds
the *slice group* of each head group: its ``m`` contiguous TP ranks, which hold the ``m`` dim
slices of the same heads and must combine before the softmax. A rank's head group ``g`` and
dim slice ``j`` follow from its TP rank ``g * m + j``.

The ring (context-parallel) group is Megatron's own CP group.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_helix.parallel_dims import HelixParallelDims


@dataclass
class _HelixGroups:
    m: int
    n: int
    slice_group: dist.ProcessGroup
    slice_group_ranks: List[int]


_GROUPS: Optional[_HelixGroups] = None


def initialize_helix(
    m: int,
    n: int,
    ring_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    **megatron_kwargs,
) -> HelixParallelDims:
    """Validate the sizes, then build Megatron's groups (TP = m*n, CP = ring) and the helix ones.

    ``megatron_kwargs`` go to ``megatron.core.parallel_state.initialize_model_parallel``
    (virtual pipeline size, expert parallel size, ...). Validation happens before any group
    is created, identically on every rank, so a bad layout fails everywhere at once.
    """
    dims = HelixParallelDims(
        world_size=dist.get_world_size(), m=m, n=n, ring=ring_size,
        pp=pipeline_model_parallel_size,
    )
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=dims.helix,
        pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.ring,
        **megatron_kwargs,
    )
    build_helix_groups(m, n)
    return dims


def build_helix_groups(m: int, n: int, timeout: Optional[timedelta] = None) -> None:
    """Create the slice groups inside every existing tensor-parallel group.

    Collective over the default group: every rank creates every group in the same order, with
    the default group's backend and ``timeout`` (Megatron's ``--distributed-timeout-minutes``;
    None keeps torch's default).
    """
    global _GROUPS
    tp_size = mpu.get_tensor_model_parallel_world_size()
    if tp_size != m * n:
        raise ValueError(
            f"--helix-m {m} x --helix-n {n} = {m * n} must equal the tensor-model-parallel size "
            f"{tp_size}: the helix group is Megatron's tensor-parallel group"
        )
    my_tp_ranks = dist.get_process_group_ranks(mpu.get_tensor_model_parallel_group())
    all_tp_ranks: List[List[int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(all_tp_ranks, my_tp_ranks)
    tp_groups = sorted({tuple(ranks) for ranks in all_tp_ranks})

    me = dist.get_rank()
    mine: tuple = ()
    for tp_ranks in tp_groups:
        for g in range(n):
            ranks = list(tp_ranks[g * m : (g + 1) * m])
            group = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                mine = (group, ranks)
    _GROUPS = _HelixGroups(m, n, *mine)


def is_initialized() -> bool:
    return _GROUPS is not None


def _groups() -> _HelixGroups:
    if _GROUPS is None:
        raise RuntimeError(
            "helix groups are not initialized: call megatron_helix.parallel_state."
            "initialize_helix(m, n, ...) (or build_helix_groups after Megatron's "
            "initialize_model_parallel)"
        )
    return _GROUPS


def get_helix_m() -> int:
    """Dim slices per head (1 when helix is not initialized: plain TP heads)."""
    return _GROUPS.m if _GROUPS else 1


def get_helix_n() -> int:
    """Head groups (Megatron's TP size when helix is not initialized)."""
    return _GROUPS.n if _GROUPS else mpu.get_tensor_model_parallel_world_size()


def get_helix_slice_group() -> dist.ProcessGroup:
    """The ``m`` ranks holding the dim slices of this rank's heads."""
    return _groups().slice_group


def get_helix_slice_rank() -> int:
    """This rank's dim slice ``j`` (its rank in the slice group)."""
    return mpu.get_tensor_model_parallel_rank() % get_helix_m()


def get_helix_head_group_rank() -> int:
    """This rank's head group ``g``."""
    return mpu.get_tensor_model_parallel_rank() // get_helix_m()


def destroy_helix() -> None:
    """Forget the helix groups (Megatron's ``destroy_model_parallel`` does the rest)."""
    global _GROUPS
    _GROUPS = None



#: Name of the helix attention-dropout stream in Megatron's RNG tracker.
HELIX_DROPOUT_RNG = "helix-dropout-rng"


def helix_manual_seed(seed: int) -> None:
    """Register the attention-dropout stream shared by the ranks of one slice group.

    With the score all-reduce strategy all ``m`` ranks of a slice group apply one shared
    probability matrix, so they must draw the same dropout mask; different head groups draw
    different ones. The stream lives in Megatron's RNG tracker (``get_cuda_rng_tracker``), so
    activation recomputation replays it and checkpoints save it with the tracker's other
    states. Call it right after Megatron's ``model_parallel_cuda_manual_seed``, which resets
    the tracker.
    """
    get_cuda_rng_tracker().add(HELIX_DROPOUT_RNG, seed + 3541 + 1009 * get_helix_head_group_rank())


@contextlib.contextmanager
def helix_dropout_generator(device: torch.device) -> Iterator[torch.Generator]:
    """Fork Megatron's tracker to the helix dropout stream; yield the generator that holds it.

    Inside the fork the device's default generator (CUDA's, or the CPU's on CPU ranks) carries
    the stream's state; the attention draws its masks from it and may replay them by saving
    and restoring that generator's state.
    """
    tracker = get_cuda_rng_tracker()
    if tracker.is_initialized() and HELIX_DROPOUT_RNG not in tracker.get_states():
        raise RuntimeError(
            "attention dropout with the helix score all-reduce strategy needs the slice "
            "group's dropout stream: call megatron_helix.parallel_state.helix_manual_seed(seed) "
            "after Megatron's model_parallel_cuda_manual_seed"
        )
    with tracker.fork(HELIX_DROPOUT_RNG):
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            yield torch.cuda.default_generators[index]
        else:
            yield torch.default_generator

"""Save and resume the plugin's trainer with Megatron's distributed checkpoints (torch_dist).

A checkpoint is ``DIR/iter_0000007/`` written by ``megatron.core.dist_checkpointing``: the model
(helix attention in the standard layout, so any layout loads it), the optimizer state in the
same model space (the distributed optimizer's ``fully_reshardable`` format), and, per rank, the
RNG state (CPU generator and Megatron's RNG tracker, the helix dropout stream included).
``DIR/latest_checkpointed_iteration.txt``, Megatron-LM's tracker file, names the newest
complete checkpoint: it is replaced (atomically) only after every rank finished writing, so a
save killed midway leaves the previous checkpoint as the one that loads.

The common state records the layout, the helix one included, so ``checkpoint_record`` can
refuse at argument time a checkpoint no layout reads. RNG states belong to one rank of one
layout: they are restored when the loading layout equals
the saved one and otherwise left as seeded (said on rank 0). The data position is the
iteration itself (``SyntheticData`` is a function of it).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_helix.checkpoint_record import TRACKER, checkpoint_dir
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _layout() -> Dict[str, object]:
    """This run's layout, with the record of its attention tensors' layout
    (``checkpoint_record``)."""
    from megatron.core import parallel_state as mpu

    from megatron_helix.checkpoint_record import layout_record
    from megatron_helix.parallel_state import get_helix_m, get_helix_n

    return {
        "world": dist.get_world_size(),
        "tp": mpu.get_tensor_model_parallel_world_size(),
        "pp": mpu.get_pipeline_model_parallel_world_size(),
        "cp": mpu.get_context_parallel_world_size(),
        **layout_record(get_helix_m(), get_helix_n()),
    }


def _rng_object(state: Optional[dict]):
    """This rank's RNG state as a ``ShardedObject`` unique to its global rank."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = dist.get_world_size()
    return ShardedObject("rng_state", state, (world,), (dist.get_rank(),), replica_id=0)


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _state(model, optimizer, iteration: int, is_loading: bool) -> dict:
    module = model.module if hasattr(model, "module") else model
    model_state = module.sharded_state_dict()
    return {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=OPTIMIZER_FORMAT),
        "rng_state": _rng_object(None if is_loading else _rng_state()),
        "iteration": iteration,
        "layout": _layout(),
    }


def save_checkpoint(directory: str, iteration: int, model, optimizer) -> str:
    """Write ``directory/iter_NNNNNNN`` on every rank, then point the tracker file at it."""
    from megatron.core import dist_checkpointing

    path = os.path.join(directory, f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_state(model, optimizer, iteration, is_loading=False), path)
    dist.barrier()
    if dist.get_rank() == 0:
        tracker = os.path.join(directory, TRACKER)
        with open(tracker + ".tmp", "w", encoding="utf-8") as f:
            f.write(f"{iteration}\n")
        os.replace(tracker + ".tmp", tracker)
    dist.barrier()
    return path


def newest_checkpoint(directory: str) -> str:
    """The newest complete checkpoint under ``directory`` (what its tracker file names).

    Raises:
        FileNotFoundError: no tracker file (no complete checkpoint) in ``directory``.
    """
    path = checkpoint_dir(directory)
    if path is None:
        raise FileNotFoundError(f"--load {directory}: no {TRACKER}, so no complete checkpoint")
    return str(path)


def load_checkpoint(directory: str, model, optimizer) -> int:
    """Load the newest complete checkpoint under ``directory``; return its iteration.

    Raises:
        FileNotFoundError: no tracker file (no complete checkpoint) in ``directory``.
    """
    from megatron.core import dist_checkpointing

    path = newest_checkpoint(directory)
    iteration = int(os.path.basename(path)[len("iter_"):])
    common = dist_checkpointing.load_common_state_dict(path)
    same_layout = common["layout"] == _layout()
    state = _state(model, optimizer, iteration, is_loading=True)
    if not same_layout:
        del state["rng_state"]
    loaded = dist_checkpointing.load(state, path)
    module = model.module if hasattr(model, "module") else model
    module.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    elif dist.get_rank() == 0:
        print(f"resuming {path} (saved at {common['layout']}) at {_layout()}: RNG states are "
              f"per rank of one layout and stay as seeded", flush=True)
    return iteration

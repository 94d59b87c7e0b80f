"""Full tensors <-> this rank's shards, and "same seed, same model" for every layout.

Megatron names parameters by local position (``decoder.layers.0`` is the first layer *of this
pipeline stage*) and initializes shards from per-rank random streams, so the same seed gives
different models under different layouts. Here every parameter is identified by its *global*
name (the layer's global number, the expert's global index), its full tensor is drawn from a
generator seeded by ``(seed, global name)`` in the standard layout, converted to helix where the
parameter belongs to a helix attention, and then cut exactly as Megatron cuts it
(``partition_dim`` over the tensor- or expert-tensor-parallel rank). One device, TP, PP and any
helix ``(m, n)`` therefore hold pieces of one and the same model.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
from megatron.core import parallel_state as mpu
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_helix.attention.helix_self_attention import HelixSelfAttention
from megatron_helix.checkpoint import to_helix
from megatron_helix.layout import HelixLayout

_LOCAL_EXPERT = re.compile(r"(local_experts\.)(\d+)(\.)")


def _chunks(model) -> Iterable[torch.nn.Module]:
    return model if isinstance(model, (list, tuple)) else [model]


def _layer_prefixes(chunk: torch.nn.Module) -> Dict[str, str]:
    """``"decoder.layers.<local>."`` -> ``"decoder.layers.<global>."`` for every layer of a chunk."""
    return {
        name + ".": re.sub(r"\d+$", str(module.layer_number - 1), name) + "."
        for name, module in chunk.named_modules()
        if isinstance(module, TransformerLayer)
    }


def _globalize(name: str, prefixes: Dict[str, str]) -> str:
    for local, global_prefix in prefixes.items():
        if name.startswith(local):
            return global_prefix + name[len(local):]
    return name


def named_global_parameters(model) -> Iterator[Tuple[str, str, torch.nn.Parameter]]:
    """Yield ``(local name, global name, parameter)`` for every parameter of every model chunk."""
    for chunk in _chunks(model):
        prefixes = _layer_prefixes(chunk)
        for name, param in chunk.named_parameters():
            global_name = _global_expert_name(_globalize(name, prefixes), param, chunk.config)
            yield name, global_name, param


def _global_expert_name(name: str, param: torch.nn.Parameter, config: TransformerConfig) -> str:
    """``local_experts.i`` -> ``local_experts.<global expert index>`` under expert parallelism."""
    ep_size = mpu.get_expert_model_parallel_world_size()
    if ep_size == 1 or getattr(param, "allreduce", True):
        return name
    first = mpu.get_expert_model_parallel_rank() * (config.num_moe_experts // ep_size)
    return _LOCAL_EXPERT.sub(
        lambda match: f"{match.group(1)}{first + int(match.group(2))}{match.group(3)}", name
    )


def helix_layouts(model) -> Dict[str, HelixLayout]:
    """Global-name prefix of every helix attention module -> its layout."""
    layouts = {}
    for chunk in _chunks(model):
        prefixes = _layer_prefixes(chunk)
        for name, module in chunk.named_modules():
            if isinstance(module, HelixSelfAttention):
                layouts[_globalize(name + ".", prefixes)] = module.helix_layout
    return layouts


def _tp_rank_and_size(param: torch.nn.Parameter) -> Tuple[int, int]:
    if not getattr(param, "allreduce", True):  # expert parameter
        return mpu.get_expert_tensor_parallel_rank(), mpu.get_expert_tensor_parallel_world_size()
    return mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The unsharded shape of a (possibly tensor-parallel) parameter."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= _tp_rank_and_size(param)[1]
    return torch.Size(shape)


def shard(full: torch.Tensor, param: torch.nn.Parameter, name: str, config: TransformerConfig) -> torch.Tensor:
    """This rank's piece of ``full`` for ``param``, cut the way Megatron cuts it.

    Gated MLPs store ``[gate; up]`` in ``linear_fc1`` and each rank holds ``[gate_r; up_r]``.
    """
    if not getattr(param, "tensor_model_parallel", False):
        return full
    rank, size = _tp_rank_and_size(param)
    dim = param.partition_dim
    if config.gated_linear_unit and "linear_fc1" in name:
        halves = full.chunk(2, dim=0)
        return torch.cat([h.chunk(size, dim=dim)[rank] for h in halves], dim=0)
    return full.chunk(size, dim=dim)[rank]


def _layout_for(global_name: str, layouts: Dict[str, HelixLayout]) -> Optional[HelixLayout]:
    for prefix, layout in layouts.items():
        if global_name.startswith(prefix):
            return layout
    return None


def own_shards(
    model, full_tensor: Callable[[str, torch.nn.Parameter], torch.Tensor]
) -> Iterator[Tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """``(global name, parameter, this rank's shard)`` for every parameter of ``model``.

    ``full_tensor(global name, parameter)`` gives the full standard-layout tensor; the shard is
    that tensor put in helix order where the parameter belongs to a helix attention, then cut
    as Megatron cuts the parameter.
    """
    layouts = helix_layouts(model)
    config = _chunks(model)[0].config
    for _, global_name, param in named_global_parameters(model):
        full = full_tensor(global_name, param)
        layout = _layout_for(global_name, layouts)
        if layout is not None:
            full = to_helix(global_name, full, layout)
        yield global_name, param, shard(full, param, global_name, config)


def load_full_state_dict(model, full_state_dict: Dict[str, torch.Tensor]) -> None:
    """Copy a full, standard-layout state dict (global names) into this rank's shards."""
    with torch.no_grad():
        for _, param, own in own_shards(model, lambda name, _: full_state_dict[name]):
            param.copy_(own)


def _name_seed(seed: int, global_name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{global_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_full_tensor(
    seed: int, global_name: str, shape: torch.Size, config: TransformerConfig
) -> torch.Tensor:
    """The full standard-layout tensor a seed gives to the parameter called ``global_name``.

    Weights follow Megatron's conventions: ``init_method``, or ``output_layer_init_method`` for
    the layers feeding the residual (``linear_proj``, ``linear_fc2``); norm weights are ones;
    biases and norm biases zeros.
    """
    if len(shape) == 1 or global_name.endswith("bias"):
        is_norm_weight = "norm" in global_name and not global_name.endswith("bias")
        return torch.ones(shape) if is_norm_weight else torch.zeros(shape)
    init: Callable = config.init_method
    if "linear_proj" in global_name or "linear_fc2" in global_name:
        init = config.output_layer_init_method
    full = torch.empty(shape, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_name_seed(seed, global_name))
        init(full)
    return full


def init_from_seed(model, seed: int) -> None:
    """Initialize every parameter so that ``seed`` gives the same model under any layout."""
    config = _chunks(model)[0].config
    load_full_state_dict(model, {
        global_name: seeded_full_tensor(seed, global_name, full_shape(param), config)
        for _, global_name, param in named_global_parameters(model)
    })

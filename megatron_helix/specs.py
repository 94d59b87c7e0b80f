"""Layer specs that put helix attention into Megatron's GPT layers.

Each spec is Megatron's own GPT layer spec (local or Transformer Engine, dense or MoE) with the
self-attention module swapped for ``HelixSelfAttention`` and its core attention for the helix
one (``HelixCoreAttention`` on one sequence shard, the ring core attention when the sequence is
split over a context-parallel ring). Linear layers, norms, MLP and MoE stay Megatron's.

For Megatron-LM's ``--spec MODULE NAME`` the module exposes ready-made objects:
``helix_layer_local_spec``, ``helix_moe_layer_local_spec``, ``helix_ring_layer_local_spec`` and
their Transformer Engine twins ``helix_layer_te_spec``, ``helix_moe_layer_te_spec``,
``helix_ring_layer_te_spec`` (without Transformer Engine these build into a clear ImportError,
so importing this module never needs it).
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_helix.attention.decode_mode import DECODE_MODES
from megatron_helix.attention.helix_core_attention import HelixCoreAttention
from megatron_helix.attention.helix_ring_core_attention import HelixRingCoreAttention
from megatron_helix.attention.helix_self_attention import HelixSelfAttention
from megatron_helix.attention.strategy import STRATEGIES


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def get_gpt_layer_helix_spec(
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    use_te: bool = False,
    score_strategy: str = "auto",
    ring: bool = False,
    position_embedding_type: str = "rope",
    normalization: Optional[str] = None,
    decode_mode: str = "auto",
) -> ModuleSpec:
    """Megatron's GPT layer spec with helix attention.

    Args:
        num_experts: MoE experts per layer (None: dense MLP).
        moe_grouped_gemm: grouped GEMM experts (TE backend).
        qk_layernorm: per-head query/key norm, the module Megatron's own spec picks (local:
            its local norm of ``normalization``'s kind; TE: its TE q/k norm); with
            ``--helix-m > 1`` it normalizes over the whole head dim across the slice group
            (``attention/sliced_norm``).
        use_te: Transformer Engine linear layers and norms instead of Megatron's local ones.
        score_strategy: ``auto``, ``allreduce`` or ``redistribute`` (see ``attention/strategy``).
        ring: the sequence is split over a context-parallel ring (``--helix-ring-size > 1``).
        position_embedding_type: the model's (``rope``, ``yarn``, ``learned_absolute``, ``none``);
            decides which head dims a slice owns.
        normalization: ``LayerNorm`` or ``RMSNorm`` (local backend; TE takes it from the config).
        decode_mode: ``auto``, ``kv-parallel`` or ``slices``: how the slice group serves a
            static KV cache (see ``attention/decode_mode``).
    """
    if score_strategy not in STRATEGIES:
        raise ValueError(f"--helix-score-strategy {score_strategy!r} not in {STRATEGIES}")
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"--helix-decode {decode_mode!r} not in {DECODE_MODES}")
    if use_te:
        if not _have_transformer_engine():
            raise ImportError(
                "the Transformer Engine helix spec needs transformer_engine; install it or use "
                "the local spec (use_te=False, helix_layer_local_spec)"
            )
        base = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm
        )
    else:
        base = get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
            qk_layernorm=qk_layernorm, normalization=normalization,
        )
    spec = copy.deepcopy(base)
    attention = spec.submodules.self_attention
    attention.module = HelixSelfAttention
    attention.params = dict(attention.params, position_embedding_type=position_embedding_type,
                            decode_mode=decode_mode)
    attention.submodules.core_attention = _core_attention_spec(score_strategy, ring)
    return spec


def _core_attention_spec(score_strategy: str, ring: bool) -> ModuleSpec:
    if ring:
        return ModuleSpec(module=HelixRingCoreAttention)
    return ModuleSpec(module=HelixCoreAttention, params={"score_strategy": score_strategy})


def _transformer_engine_missing(*args, **kwargs):
    raise ImportError(
        "this helix spec uses Transformer Engine layers and transformer_engine is not installed; "
        "use megatron_helix.specs helix_layer_local_spec (or helix_moe_layer_local_spec)"
    )


def _te_spec(**kwargs) -> ModuleSpec:
    """A real module attribute either way: Megatron's ``--spec`` reads ``vars(module)[name]``."""
    if _have_transformer_engine():
        return get_gpt_layer_helix_spec(use_te=True, **kwargs)
    return ModuleSpec(module=_transformer_engine_missing)


# Ready-made specs for Megatron-LM's ``--spec megatron_helix.specs NAME``. MoE specs take the
# expert count from the config (``--num-experts``); the ring specs need a context-parallel ring.
helix_layer_local_spec = get_gpt_layer_helix_spec()
helix_moe_layer_local_spec = get_gpt_layer_helix_spec(num_experts=1)
helix_ring_layer_local_spec = get_gpt_layer_helix_spec(ring=True)
helix_layer_te_spec = _te_spec()
helix_moe_layer_te_spec = _te_spec(num_experts=1)
helix_ring_layer_te_spec = _te_spec(ring=True)

"""``SelfAttention`` whose heads are split into ``n`` groups and whose head dims into ``m`` slices.

The module keeps Megatron's ``linear_qkv`` (column-parallel) and ``linear_proj``
(row-parallel) over the helix group, which is Megatron's tensor-parallel group of ``m * n``
ranks: same total widths as TP, so local and Transformer Engine GEMMs are reused unchanged.
Only the meaning of the local columns differs: rank ``(g, j)`` holds q, k and v of head group
``g`` restricted to the dims of slice ``j`` (``layout.HelixLayout.qkv_row_permutation``), and
its core-attention output, the projection's local input, is those heads' slice-``j`` dims.

RoPE is applied by Megatron's own kernels to the local slice, with the rotary frequencies
indexed by the same dims as q and k: slices keep RoPE pairs together (``layout.slice_dims``).

With a static inference context the slice group decodes in one of two modes (``decode_mode``,
``--helix-decode``; ``attention/decode_mode.py``): ``slices``, Megatron's forward on the slices
above with a ``[max_seq, b, G/n, d/m]`` cache and the score all-reduce, or ``kv-parallel``
(``attention/kv_parallel_decode.py``), a ``[ceil(max_seq/m), b, G/n, d]`` cache of every
``m``-th token and context-independent traffic.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer import attention as megatron_attention
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_helix import compat
from megatron_helix import parallel_state as helix_state
from megatron_helix.attention.decode_mode import DECODE_MODES, choose_decode_mode
from megatron_helix.attention.kv_parallel_decode import (
    allocate_cache,
    gather_head_dims,
    kv_parallel_attention,
)
from megatron_helix.attention.strategy import SliceGroupShape
from megatron_helix.attention.sliced_norm import NORMALIZATIONS, sliced_head_norm
from megatron_helix.attention.unsupported_features import unsupported_attention_features
from megatron_helix.checkpoint import standard_layout_factory
from megatron_helix.layout import HelixLayout, rope_pairing


@contextlib.contextmanager
def _tolerate_uneven_tp_heads(config: TransformerConfig, tp: int):
    """Let ``Attention.__init__`` size its TP partitions when heads do not divide by TP.

    The one module-wide patch of this attention, and why it exists: megatron-core's
    ``Attention.__init__`` divides the heads (and, from TP ranks up, the query groups) by the
    TP size with ``divide``, which asserts divisibility, and it has no argument or spec hook to
    size the partitions otherwise. With helix that size is ``m * n`` while heads need only
    divide by ``n`` (6 heads on helix 2 x 2). Only for such layouts is ``divide`` swapped for a
    floor division, during the construction only; ``_use_helix_sizes`` replaces the values it
    computes right after.
    """
    groups = config.num_query_groups or config.num_attention_heads
    if config.num_attention_heads % tp == 0 and (groups < tp or groups % tp == 0):
        yield
        return
    original = megatron_attention.divide
    megatron_attention.divide = lambda numerator, denominator: numerator // denominator
    try:
        yield
    finally:
        megatron_attention.divide = original


def _in_helix_order(init_method, dim: int, permutation: list):
    """``init_method`` followed, on a *full* weight, by the standard -> helix reordering.

    With ``use_cpu_initialization`` Megatron draws each full weight and hands rank ``r`` its
    ``r``-th contiguous block along the partition dim: reordered first, that block holds rank
    ``r``'s helix rows (or columns), so a helix run holds exactly the one-device model. A
    per-rank draw (GPU initialization) has the local shape and is left as drawn.
    """

    def init(weight: Tensor) -> None:
        init_method(weight)
        if weight.shape[dim] == len(permutation):
            index = torch.tensor(permutation, device=weight.device)
            with torch.no_grad():
                weight.copy_(weight.index_select(dim, index))

    return init


@contextlib.contextmanager
def _drawing_in_helix_order(config: TransformerConfig, layout: HelixLayout):
    """During ``Attention.__init__``: QKV rows and projection input columns drawn in helix order.

    ``SelfAttention`` builds ``linear_qkv`` with ``config.init_method`` and ``linear_proj``
    with ``config.output_layer_init_method``; both are wrapped for the construction only.
    """
    saved = config.init_method, config.output_layer_init_method
    config.init_method = _in_helix_order(saved[0], 0, layout.qkv_row_permutation())
    config.output_layer_init_method = _in_helix_order(saved[1], 1, layout.proj_col_permutation())
    try:
        yield
    finally:
        config.init_method, config.output_layer_init_method = saved


class HelixSelfAttention(SelfAttention):
    """Self-attention with helix ``(m, n)`` partitioning over the tensor-parallel group.

    Needs ``megatron_helix.parallel_state`` initialized (``initialize_helix`` or
    ``build_helix_groups``). The model's position embedding type decides the dim slicing;
    pass it as a spec param (``position_embedding_type``) when it is not ``rope``.
    ``decode_mode`` (spec param): ``auto``, ``kv-parallel`` or ``slices``, how a static
    inference context is served (``attention/decode_mode.choose_decode_mode``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        position_embedding_type: str = "rope",
        decode_mode: str = "auto",
        pp_layer_offset: Optional[int] = None,
        name: Optional[str] = None,
    ):
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"--helix-decode {decode_mode!r} not in {DECODE_MODES}")
        self.decode_mode = decode_mode
        m, n = helix_state.get_helix_m(), helix_state.get_helix_n()
        self.helix_layout = HelixLayout(
            m, n, config.num_attention_heads, config.num_query_groups or config.num_attention_heads,
            config.kv_channels, rope_pairing(position_embedding_type, config.rotary_interleaved),
        )
        _refuse_unsupported(config, submodules, m)
        with _tolerate_uneven_tp_heads(config, m * n), \
                _drawing_in_helix_order(config, self.helix_layout):
            super().__init__(
                config, submodules, layer_number, attn_mask_type=attn_mask_type,
                cp_comm_type=cp_comm_type, pg_collection=pg_collection,
                **compat.self_attention_kwargs(pp_layer_offset=pp_layer_offset, name=name),
            )
        self._use_helix_sizes()
        dims = self.helix_layout.slice_dims(helix_state.get_helix_slice_rank())
        self.register_buffer("rope_dims", torch.tensor(dims, dtype=torch.long), persistent=False)
        in_slice_order = [i for j in range(m) for i in self.helix_layout.slice_dims(j)]
        self.register_buffer(
            "dim_order", torch.tensor(in_slice_order, dtype=torch.long), persistent=False
        )

    def _use_helix_sizes(self) -> None:
        """Set the per-rank sizes ``Attention.__init__`` computed for plain TP to helix's.

        megatron-core computes them in its constructor from the TP size, with no hook to pass
        them in. This rank holds ``H/n`` heads and ``G/n`` query groups of ``d/m`` dims each.
        Megatron's ``forward``, the slice path's inference KV cache
        (``[max_seq, b, G/n, d/m]`` per rank) and the CUDA-graph buffers read these attributes.
        """
        layout = self.helix_layout
        self.num_attention_heads_per_partition = layout.heads_per_group
        self.num_query_groups_per_partition = layout.query_groups_per_group
        self.hidden_size_per_attention_head = layout.slice_dim
        self.key_hidden_size = self.val_hidden_size = layout.slice_dim

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Megatron's, with the QKV and projection weights described in the standard layout.

        Megatron's default would store this rank's helix-ordered rows as its TP block, which
        only the same ``(m, n)`` could read back; as pieces of the standard tensors
        (``checkpoint.standard_layout_factory``) the checkpoint loads at any layout.
        """
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        layout = self.helix_layout
        if layout.m == 1:  # whole heads: the helix order is the standard TP order
            return state
        rank = self.pg_collection.tp.rank()
        for name, dim, permutation in (
            ("linear_qkv.weight", 0, layout.qkv_row_permutation()),
            ("linear_qkv.bias", 0, layout.qkv_row_permutation()),
            ("linear_proj.weight", 1, layout.proj_col_permutation()),
        ):
            key = prefix + name
            if key in state:
                state[key] = standard_layout_factory(
                    state[key], sharded_offsets, dim, permutation, rank)
        return state

    def get_query_key_value_tensors(
        self,
        hidden_states: Tensor,
        key_value_states: Optional[Tensor] = None,
        output_gate: bool = False,
        split_qkv: bool = True,
    ):
        """``[sq, b, h]`` -> q ``[sq, b, H/n, d/m]``, k and v ``[sq, b, G/n, d/m]``.

        The q/k norms (``--qk-layernorm``) run here, before RoPE, as in Megatron's
        ``SelfAttention``: whole heads (``m = 1``) call the modules; sliced heads normalize
        with statistics all-reduced over the slice group (``sliced_norm``).
        """
        mixed_qkv, _ = self.linear_qkv(hidden_states)
        layout = self.helix_layout
        q_per_kv = layout.num_heads // layout.num_query_groups
        dm = layout.slice_dim
        # [sq, b, G/n * (q_per_kv + 2) * d/m] -> [sq, b, G/n, (q_per_kv + 2) * d/m]
        mixed_qkv = mixed_qkv.view(
            *mixed_qkv.shape[:2], layout.query_groups_per_group, (q_per_kv + 2) * dm
        )
        query, key, value = torch.split(mixed_qkv, [q_per_kv * dm, dm, dm], dim=3)
        query = query.reshape(*query.shape[:2], layout.heads_per_group, dm)
        if layout.m == 1:
            if self.q_layernorm is not None:
                query = self.q_layernorm(query)
            if self.k_layernorm is not None:
                key = self.k_layernorm(key)
        else:
            group = helix_state.get_helix_slice_group()
            query = sliced_head_norm(
                query, self.q_layernorm, self.rope_dims, layout.head_dim, self.config, group
            )
            key = sliced_head_norm(
                key, self.k_layernorm, self.rope_dims, layout.head_dim, self.config, group
            )
        return query, key, value

    def forward(self, hidden_states: Tensor, attention_mask: Tensor, *args, **kwargs):
        """Megatron's ``Attention.forward`` with the rotary frequencies cut to this slice."""
        context = kwargs.get("inference_context") or kwargs.get("inference_params")
        if context is not None and (not context.is_static_batching() or self.config.flash_decode):
            raise NotImplementedError(
                "helix attention supports KV-cache inference with static batching "
                "(StaticInferenceContext) without flash decode; dynamic batching and "
                "--flash-decode are not supported"
            )
        if args:
            raise TypeError("HelixSelfAttention.forward takes hidden_states, attention_mask "
                            "and keyword arguments")
        rotary = kwargs.get("rotary_pos_emb")
        if context is not None and (
                self.resolved_decode_mode(context, hidden_states) == "kv-parallel"):
            return self._kv_parallel_forward(hidden_states, context, **kwargs)
        if rotary is not None:
            kwargs["rotary_pos_emb"] = self._slice_rotary(rotary)
        return super().forward(hidden_states, attention_mask, **kwargs)

    def resolved_decode_mode(self, context, hidden_states: Tensor) -> str:
        """``kv-parallel`` or ``slices`` for this static context: fixed by its maximum batch and
        sequence length, so prefill and every decode step of one context agree."""
        layout = self.helix_layout
        shape = SliceGroupShape(
            m=layout.m, batch=context.max_batch_size, seq_q=1,
            seq_kv=context.max_sequence_length, heads=layout.heads_per_group,
            kv_heads=layout.query_groups_per_group, slice_dim=layout.slice_dim,
            element_bytes=hidden_states.element_size(),
        )
        return choose_decode_mode(self.decode_mode, shape)

    def _kv_parallel_forward(
        self, hidden_states: Tensor, context, rotary_pos_emb=None, attention_bias=None,
        packed_seq_params=None, **unused,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``[sq, b, h]`` new tokens -> the projection's ``(output, bias)``, the cache kept by
        sequence over the slice group (``attention/kv_parallel_decode.py``)."""
        self._refuse_for_kv_parallel(attention_bias, packed_seq_params)
        if context.sequence_len_offset > 0 and hidden_states.shape[0] > 1:
            # megatron-core's static path attends such tokens to each other without a causal
            # mask; kv-parallel masks them, so the two would differ: refused, not different.
            raise NotImplementedError(
                f"--helix-decode kv-parallel runs a prefill and then one token per forward; "
                f"got {hidden_states.shape[0]} tokens after position "
                f"{context.sequence_len_offset} (use --helix-decode slices)"
            )
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        group = helix_state.get_helix_slice_group()
        widths = [query.shape[2], key.shape[2], value.shape[2]]
        whole = gather_head_dims(torch.cat((query, key, value), dim=2), self.dim_order, group)
        query, key, value = torch.split(whole, widths, dim=2)
        offset = context.sequence_len_offset
        end = offset + query.shape[0]
        if end > context.max_sequence_length:
            raise ValueError(
                f"positions up to {end} exceed the inference context's maximum sequence length "
                f"{context.max_sequence_length}; increase it"
            )
        query, key = self._rotate(query, key, rotary_pos_emb, offset, end)
        memory = context.key_value_memory_dict
        if self.layer_number not in memory:
            memory[self.layer_number] = allocate_cache(
                context.max_sequence_length, context.max_batch_size, self.helix_layout.m,
                key.shape[2], key.shape[3], key,
            )
        out = kv_parallel_attention(
            query, key, value, memory[self.layer_number], offset, context.batch_size_offset,
            self.core_attention.softmax_scale, self.dim_order, group,
        )
        return self.linear_proj(out.flatten(2))

    def _rotate(self, query: Tensor, key: Tensor, rotary, start: int, end: int):
        """RoPE on whole heads ``[sq, b, heads, d]`` at positions ``start:end``, by Megatron's
        ``apply_rotary_pos_emb`` with the arguments its ``Attention.forward`` passes (the
        rotary ``[max_seq, 1, 1, d]`` is indexed by absolute position, as there)."""
        no_rope = self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]
        if rotary is None or no_rope:
            return query, key
        q_freqs, k_freqs = rotary if isinstance(rotary, tuple) else (rotary, rotary)
        kwargs = dict(config=self.config, cp_group=self.pg_collection.cp,
                      mscale=_yarn_get_concentration_factor_from_config(self.config))
        if q_freqs is not None:
            query = apply_rotary_pos_emb(query, q_freqs[start:end], **kwargs)
        if k_freqs is not None:
            key = apply_rotary_pos_emb(key, k_freqs[start:end], **kwargs)
        return query, key

    def _refuse_for_kv_parallel(self, attention_bias, packed_seq_params) -> None:
        """What the kv-parallel forward does not run, refused by name."""
        problems = []
        if self.attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            problems.append(f"attention mask type {self.attn_mask_type.name} (it masks "
                            f"causally by position)")
        if attention_bias is not None:
            problems.append("an attention bias")
        if packed_seq_params is not None:
            problems.append("packed sequences (THD)")
        if self.config.context_parallel_size > 1:
            problems.append("a context-parallel ring")
        if problems:
            raise NotImplementedError(
                "--helix-decode kv-parallel does not support " + "; ".join(problems)
                + " (use --helix-decode slices)"
            )

    def _slice_rotary(self, rotary):
        """Index the rotary frequencies ``[s, 1, 1, d]`` by this rank's dims -> ``[s, 1, 1, d/m]``."""
        if isinstance(rotary, tuple):
            return tuple(None if r is None else self._slice_rotary(r) for r in rotary)
        if rotary.shape[-1] != self.helix_layout.head_dim:
            raise ValueError(
                f"rotary embedding covers {rotary.shape[-1]} of {self.helix_layout.head_dim} head "
                f"dims: --rotary-percent < 1 is not supported with helix (m > 1)"
            )
        return rotary.index_select(-1, self.rope_dims)


def _refuse_unsupported(config: TransformerConfig, submodules: SelfAttentionSubmodules, m: int):
    """Features this attention does not build, refused before any work (the argument check
    refuses the ones with a Megatron-LM flag earlier)."""
    has_qk_norm = any(
        mod is not None and mod is not IdentityOp
        for mod in (submodules.q_layernorm, submodules.k_layernorm)
    )
    problems = []
    if m > 1 and has_qk_norm and config.normalization not in NORMALIZATIONS:
        problems.append(f"--qk-layernorm with --normalization {config.normalization} at "
                        f"--helix-m {m} (the head-dim-sliced q/k norm supports "
                        f"{' and '.join(NORMALIZATIONS)})")
    problems += unsupported_attention_features(config)
    if problems:
        raise ValueError(
            f"helix attention (--helix-m {m}) does not support: " + "; ".join(problems)
        )

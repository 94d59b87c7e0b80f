"""Closed-form bytes each rank *sends* per layer and micro-batch, for every parallel mode.

The collective algorithms are those ``comm_counter`` measures and ``attention/strategy.py``
assumes (``m`` ranks, ``N`` bytes): ring all-reduce ``2 (m-1) N / m``, all-gather ``m-1``
local shards, reduce-scatter ``m-1`` output shards, all-to-all ``(m-1) / m`` of the buffer,
point-to-point the tensor. In all of these a rank receives what it sends (pipeline ends aside).

Per mode (``e`` bytes per activation element, ``T`` tokens per micro-batch on the rank's
tensor-parallel group: ``b s / R`` with a ring of ``R``; ``D`` hidden):

- **Megatron TP** of ``t`` (attention and MLP blocks, each a column- then a row-parallel
  linear): without sequence parallelism one all-reduce of ``T D e`` per block forward (row
  output) and one backward (column input gradient). With sequence parallelism, per block,
  forward all-gather (column input) + reduce-scatter (row output), backward all-gather (row
  output gradient) + all-gather (column input again, for the weight gradient; Megatron does
  not keep the gathered input) + reduce-scatter (column input gradient).
- **Helix** ``m x n``: the TP traffic of ``t = m n`` plus the slice group's, from
  ``attention/strategy.py`` (redistribute exactly; score all-reduce per query block, over the
  score pairs actually computed — causal blocks stop at the diagonal).
- **Helix decode** with a static KV cache, per forward of ``sq`` new tokens (``attention/
  decode_mode.py``): the slice path's score all-reduce over ``b H/n sq s_kv`` fp32 scores,
  growing with the context ``s_kv``; kv-parallel's all-gather of the new q, k, v slices and of
  their fp32 LSE and reduce-scatter of the output, independent of ``s_kv``. Plus the TP
  traffic of ``t = m n`` for ``b sq`` tokens, forward only.
- **Ring** of ``R``: forward, ``R - 1`` shifts of the stacked local k and v
  (``2 (s/R) b g d e``); backward, ``R - 1`` shifts of k and v again plus ``R`` shifts of their
  fp32 gradient accumulators. With helix ``m > 1`` each of q, k, v and the output is also
  all-to-all'ed between dim slices and whole heads inside the slice group, both ways.
- **PP**: per micro-batch, the stage output ``T D e`` (``T / t`` with sequence parallelism)
  to the next stage forward, its gradient to the previous stage backward.
- **DP**: one ring all-reduce of the gradient buffer per step.
"""

from __future__ import annotations

from megatron_helix.attention.decode_mode import (
    kv_parallel_bytes_sent,
    slices_decode_bytes_sent,
)
from megatron_helix.attention.strategy import (
    QUERY_BLOCK_SIZE,
    SliceGroupShape,
    allreduce_bytes_sent,
    redistribute_bytes_sent,
)

FP32_BYTES = 4
FP64_BYTES = 8


# ------------------------------------------------------------------- collective algorithms


def all_reduce_sent(n_bytes: int, m: int) -> int:
    """Ring all-reduce of ``n_bytes`` over ``m`` ranks: reduce-scatter then all-gather."""
    return 2 * (m - 1) * n_bytes // m


def all_gather_sent(shard_bytes: int, m: int) -> int:
    """Ring all-gather: each rank forwards ``m - 1`` shards of ``shard_bytes``."""
    return (m - 1) * shard_bytes


def reduce_scatter_sent(shard_bytes: int, m: int) -> int:
    """Ring reduce-scatter to ``shard_bytes`` per rank: ``m - 1`` partial shards."""
    return (m - 1) * shard_bytes


def all_to_all_sent(n_bytes: int, m: int) -> int:
    """All-to-all of a ``n_bytes`` buffer: every slot but the rank's own."""
    return n_bytes - n_bytes // m


# ------------------------------------------------------------------------------- modes


def tp_layer_bytes(
    tokens: int, hidden: int, tp: int, element_bytes: int, sequence_parallel: bool,
    backward: bool = True,
) -> int:
    """Megatron TP traffic of one transformer layer (attention + MLP block) per micro-batch.

    ``tokens``: the micro-batch's tokens on this TP group (``b s``, or ``b s / R`` in a ring).
    """
    if tp == 1:
        return 0
    n = tokens * hidden * element_bytes
    if sequence_parallel:
        shard = n // tp
        forward = all_gather_sent(shard, tp) + reduce_scatter_sent(shard, tp)
        back = 2 * all_gather_sent(shard, tp) + reduce_scatter_sent(shard, tp)
    else:
        forward = back = all_reduce_sent(n, tp)
    return 2 * (forward + (back if backward else 0))


def helix_attention_bytes(
    shape: SliceGroupShape, strategy: str, causal: bool = True,
    query_block_size: int = QUERY_BLOCK_SIZE,
    backward: bool = True,
) -> int:
    """Slice-group traffic of one helix attention layer per micro-batch (not the TP part).

    ``strategy`` is the resolved one (``allreduce`` or ``redistribute``); see
    ``attention.strategy.choose_strategy`` for ``auto``. The score all-reduce counts the pairs
    each query block computes (causal blocks stop at the diagonal).
    """
    if strategy == "redistribute":
        return redistribute_bytes_sent(shape, backward)
    if strategy != "allreduce":
        raise ValueError(f"strategy {strategy!r} is neither 'allreduce' nor 'redistribute'")
    return allreduce_bytes_sent(shape, backward, causal, query_block_size)


def helix_decode_bytes(shape: SliceGroupShape, mode: str) -> int:
    """Slice-group traffic of one helix attention layer's forward with a static KV cache (not
    the TP part): ``shape.seq_q`` new tokens per sequence (1 when decoding) over a context of
    ``shape.seq_kv`` tokens, in the resolved ``mode`` (``kv-parallel`` or ``slices``; see
    ``attention.decode_mode.choose_decode_mode`` for ``auto``). Without ``--qk-layernorm``,
    whose sliced norm adds its statistics' all-reduce in both modes."""
    if mode == "kv-parallel":
        return kv_parallel_bytes_sent(shape)
    if mode != "slices":
        raise ValueError(f"decode mode {mode!r} is neither 'kv-parallel' nor 'slices'")
    return slices_decode_bytes_sent(shape)


def ring_attention_bytes(
    ring: int, local_tokens: int, kv_heads: int, head_dim: int, element_bytes: int,
    backward: bool = True,
) -> int:
    """Ring traffic of one attention layer per micro-batch on the context-parallel group.

    ``local_tokens``: ``b s / R``; ``kv_heads``/``head_dim``: the whole heads the ring carries
    (``G / (n m)`` heads of ``d`` with helix, equal in bytes to ``G / n`` heads of ``d / m``).
    """
    if ring == 1:
        return 0
    kv = 2 * local_tokens * kv_heads * head_dim
    forward = (ring - 1) * kv * element_bytes
    back = (ring - 1) * kv * element_bytes + ring * kv * FP32_BYTES
    return forward + (back if backward else 0)


def helix_ring_exchange_bytes(
    m: int, local_tokens: int, heads: int, kv_heads: int, slice_dim: int, element_bytes: int,
    backward: bool = True,
) -> int:
    """Helix ``m > 1`` under a ring: q, k, v and the output trade dim slices for whole heads
    inside the slice group (``heads``/``kv_heads`` per head group, ``slice_dim = d / m``)."""
    if m == 1:
        return 0
    q_or_out = local_tokens * heads * slice_dim * element_bytes
    k_or_v = local_tokens * kv_heads * slice_dim * element_bytes
    forward = 2 * all_to_all_sent(q_or_out, m) + 2 * all_to_all_sent(k_or_v, m)
    return forward * (2 if backward else 1)


def pipeline_p2p_bytes(
    activation_bytes: int, stage: int, num_stages: int, micro_batches: int, backward: bool = True
) -> int:
    """Bytes a pipeline stage sends per step: its output forward (unless last) and its input
    gradient backward (unless first), ``activation_bytes`` each, per micro-batch."""
    forward = activation_bytes if stage < num_stages - 1 else 0
    back = activation_bytes if (backward and stage > 0) else 0
    return micro_batches * (forward + back)


def data_parallel_bytes(grad_buffer_bytes: int, dp: int) -> int:
    """Gradient all-reduce over the data-parallel group, once per step."""
    return all_reduce_sent(grad_buffer_bytes, dp)

"""What one rank computes and communicates per transformer layer, pass and micro-batch.

The cost model prices this work with a ``Calibration``; nothing here knows about time. Shapes
follow the implementation (``T = b s / R`` tokens on a rank's tensor-parallel group, ``t`` the
TP size, ``T_n = T / t`` with sequence parallelism, per-rank widths ``/ t``):

- GEMMs: QKV ``[T, D] x [D, (H + 2G) d / t]``, projection, fc1, fc2 (MoE: top-k experts'
  tokens), each forward once and backward twice (input gradient ``[T, N] x [N, K]`` and weight
  gradient ``[N, T] x [T, K]``); the output layer on the last stage.
- attention, one call of the kernel the layout runs (``memory.Kernels``) in the causal flash
  FLOP convention, priced by that kernel's measured (CPU) or assumed (GPU) rate.
- element-wise traffic (norms, residuals, bias, activation, RoPE): passes over the tensors,
  each read + write, backward twice forward. An estimate, stated per term below.
- communication as ``CommOp`` lists whose bytes are ``comm_formulas``' (tests check the sums).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

from megatron_helix.attention.decode_mode import choose_decode_mode
from megatron_helix.attention.strategy import SliceGroupShape, query_blocks
from megatron_helix.layerwise import ModelShape
from megatron_helix.perf.calibration import flash_attention_flops
from megatron_helix.perf.comm_formulas import (
    FP32_BYTES,
    all_gather_sent,
    all_reduce_sent,
    all_to_all_sent,
    reduce_scatter_sent,
)
from megatron_helix.perf.layouts import ParallelLayout
from megatron_helix.perf.memory import Kernels, kv_elements_per_token

Gemm = Tuple[int, int, int]  # (m, n, k): [m, k] x [k, n]


@dataclass(frozen=True)
class CommOp:
    """``calls`` collectives of one kind on one group: ``sent`` bytes in all (this rank),
    ``steps`` sequential algorithm steps per call. ``overlapped``: posted asynchronously
    beside compute (the ring's k/v passing)."""

    collective: str
    group: str
    sent: int
    calls: int = 1
    steps: int = 1
    overlapped: bool = False


@dataclass(frozen=True)
class AttentionWork:
    """One attention kernel call (``calibration.ATTENTION_KERNELS``): FLOPs in the causal
    flash convention at ``shape`` ``(batch x heads, seq, head_dim)``, moving ``bytes``
    through memory (q, k, v, the output, gradients, materialized scores)."""

    kernel: str
    flops: float
    shape: Tuple[int, int, int]
    bytes: float
    backward: bool


@dataclass
class PassWork:
    """One pass (forward or backward) of one layer or model piece on one rank."""

    gemms: List[Gemm] = field(default_factory=list)
    attention: List[AttentionWork] = field(default_factory=list)
    elementwise_bytes: float = 0.0
    comms: List[CommOp] = field(default_factory=list)

    def __iadd__(self, other: "PassWork") -> "PassWork":
        self.gemms += other.gemms
        self.attention += other.attention
        self.elementwise_bytes += other.elementwise_bytes
        self.comms += other.comms
        return self


def _backward_gemms(gemms: List[Gemm]) -> List[Gemm]:
    """Input gradient ``[m, n] x [n, k]`` and weight gradient ``[n, m] x [m, k]`` per GEMM."""
    return [g for m, n, k in gemms for g in ((m, k, n), (n, k, m))]


@dataclass(frozen=True)
class LayerShape:
    """One rank's view of a layer: the model, its layout and the micro-batch."""

    model: ModelShape
    layout: ParallelLayout
    micro_batch: int
    seq_length: int
    element_bytes: int
    kernels: Kernels = Kernels()
    causal: bool = True

    @property
    def tokens(self) -> int:
        """``T``: tokens of the micro-batch on this rank's tensor-parallel group."""
        return self.micro_batch * self.seq_length // self.layout.cp

    @property
    def norm_tokens(self) -> int:
        """``T_n``: tokens in the norm / residual region (``T / t`` with sequence parallelism)."""
        return self.tokens // self.layout.tp if self.layout.sequence_parallel else self.tokens

    @property
    def attention(self) -> str:
        return self.kernels.attention_for(self.layout)

    def slice_shape(self) -> SliceGroupShape:
        m, n = self.layout.helix_m, self.layout.helix_n
        return SliceGroupShape(
            m=m, batch=self.micro_batch, seq_q=self.seq_length, seq_kv=self.seq_length,
            heads=self.model.num_attention_heads // n, kv_heads=self.model.query_groups // n,
            slice_dim=self.model.head_dim // m, element_bytes=self.element_bytes,
        )


# ------------------------------------------------------------------------------ GEMMs


def _linear_gemms(x: LayerShape) -> List[Gemm]:
    m, t, T, D = x.model, x.layout.tp, x.tokens, x.model.hidden_size
    routed = T * m.active_experts
    gemms = [(T, m.qkv_width // t, D), (T, D, m.context_width // t),
             (routed, m.fc1_width // t, D), (routed, D, m.ffn_hidden_size // t)]
    if m.num_experts:
        gemms.append((x.norm_tokens, m.num_experts, D))  # router, replicated
    return gemms


# -------------------------------------------------------------------------- attention


def _attention(x: LayerShape, kernel: str, backward: bool, heads: int, queries: int,
               head_dim: int, scores: float = 0.0, block: int = 0) -> AttentionWork:
    """``heads`` heads (batch folded in) of ``queries`` query rows against the causal prefix
    of the sequence with ``head_dim`` dims; ``scores``: materialized score bytes; ``block``:
    the sequence length the kernel is called with (default the whole sequence), which is
    what the calibration tables are keyed by."""
    b, s, e = x.micro_batch, x.seq_length, x.element_bytes
    flops = flash_attention_flops(b * heads, queries, s, head_dim, x.causal, backward)
    moved = (2 if backward else 1) * (b * heads * (2 * queries + 2 * s) * head_dim * e + scores)
    return AttentionWork(kernel, flops, (b * heads, block or s, head_dim), moved, backward)


def _unfused_attention(x: LayerShape, backward: bool) -> PassWork:
    """Megatron's ``DotProductAttention``: full ``s x s`` scores materialized and soft-maxed."""
    heads, s = x.model.num_attention_heads // x.layout.tp, x.seq_length
    scores = 4 * x.micro_batch * heads * s * s * x.element_bytes  # a few passes over them
    return PassWork(attention=[_attention(x, "unfused", backward, heads, s, x.model.head_dim,
                                          scores)])


def _score_allreduce_attention(x: LayerShape, backward: bool) -> PassWork:
    """Helix score all-reduce: fp32 partial scores over the rank's ``d/m`` dims per query
    block, one all-reduce per block (two stacked backward), soft-max, ``P v``."""
    shape = x.slice_shape()
    scores = shape.batch * shape.heads * shape.seq_q * shape.seq_kv * FP32_BYTES
    work = PassWork(attention=[_attention(x, "score_allreduce", backward, shape.heads,
                                          shape.seq_q, shape.slice_dim, 4 * scores)])
    for q0, q1, k1 in query_blocks(shape.seq_q, shape.seq_kv, x.causal):
        block = shape.batch * shape.heads * (q1 - q0) * k1 * FP32_BYTES * (2 if backward else 1)
        work.comms.append(CommOp("all_reduce", "helix_slice", all_reduce_sent(block, shape.m),
                                 steps=2 * (shape.m - 1)))
    return work


def _redistribute_attention(x: LayerShape, backward: bool) -> PassWork:
    """Helix redistribute: all-to-all q and the output, all-gather k and v (reduce-scatter
    their gradients backward), attention of ``s/m`` query tokens with the full head dim."""
    shape, m = x.slice_shape(), x.layout.helix_m
    token_dims = shape.batch * shape.seq_q * shape.slice_dim * shape.element_bytes
    q_bytes, kv_bytes = shape.heads * token_dims, shape.kv_heads * token_dims
    gather = "reduce_scatter" if backward else "all_gather"
    gather_sent = (reduce_scatter_sent if backward else all_gather_sent)(kv_bytes, m)
    return PassWork(
        attention=[_attention(x, "redistribute", backward, shape.heads, shape.seq_q // m,
                              x.model.head_dim)],
        comms=[CommOp("all_to_all", "helix_slice", 2 * all_to_all_sent(q_bytes, m), calls=2,
                      steps=m - 1),
               CommOp(gather, "helix_slice", 2 * gather_sent, calls=2, steps=m - 1)],
    )


def _ring_attention(x: LayerShape, backward: bool) -> PassWork:
    """Ring: ``R`` flash block steps; k/v shards (and backward their fp32 gradients) pass to
    the next rank while a step computes. Helix ``m > 1`` first trades dim slices for whole
    heads (all-to-all of q, k, v and the output inside the slice group)."""
    R, m, t = x.layout.cp, x.layout.helix_m, x.layout.tp
    heads, kv_heads = x.model.num_attention_heads // t, x.model.query_groups // t
    d = x.model.head_dim
    kv = 2 * x.tokens * kv_heads * d
    comms = [CommOp("p2p", "cp", (R - 1) * kv * x.element_bytes, calls=R - 1, overlapped=True)]
    if backward:
        comms.append(CommOp("p2p", "cp", R * kv * FP32_BYTES, calls=R, overlapped=True))
    if m > 1:
        token_dims = x.tokens * (d // m) * x.element_bytes
        exchanged = 2 * all_to_all_sent(heads * m * token_dims, m) + 2 * all_to_all_sent(
            kv_heads * m * token_dims, m)
        comms.append(CommOp("all_to_all", "helix_slice", exchanged, calls=4, steps=m - 1))
    local = x.seq_length // R
    return PassWork(attention=[_attention(x, "flash", backward, heads, local, d, block=local)],
                    comms=comms)


def attention_work(x: LayerShape, backward: bool) -> PassWork:
    """The core attention of one layer: the ring when the sequence is split, else the kernel
    ``x.kernels`` names for the layout."""
    if x.layout.cp > 1:
        return _ring_attention(x, backward)
    kernel = x.attention
    if kernel == "unfused":
        return _unfused_attention(x, backward)
    if kernel == "score_allreduce":
        return _score_allreduce_attention(x, backward)
    if kernel == "redistribute":
        return _redistribute_attention(x, backward)
    heads = x.model.num_attention_heads // x.layout.tp
    return PassWork(attention=[_attention(x, "flash", backward, heads, x.seq_length,
                                          x.model.head_dim)])


# ------------------------------------------------------------------ tensor parallelism


def _tp_comms(x: LayerShape, backward: bool) -> List[CommOp]:
    """Megatron TP of the attention and MLP blocks (``comm_formulas.tp_layer_bytes``): per
    block an all-reduce each way, or with sequence parallelism a gather + reduce-scatter
    forward and two gathers (the row output gradient, the column input again for the weight
    gradient) + a reduce-scatter backward."""
    if x.layout.tp == 1:
        return []
    if not x.layout.sequence_parallel:
        per_block = ["all_reduce"]
    else:
        per_block = ["all_gather", "all_gather", "reduce_scatter"] if backward else [
            "all_gather", "reduce_scatter"]
    return [_tp_region_comm(x, collective) for _ in range(2) for collective in per_block]


def _layer_elementwise(x: LayerShape) -> float:
    """Forward element-wise bytes outside attention: two norms (read + write ``T_n D``), two
    residual adds with Megatron's fused bias (read 2, write 1), the QKV bias and fc1 bias +
    activation (read + write each), RoPE on q and k (read + write)."""
    m, t, e = x.model, x.layout.tp, x.element_bytes
    norm_region = x.norm_tokens * m.hidden_size
    rope = 2 * x.tokens * (m.num_attention_heads + m.query_groups) * m.head_dim // t
    mlp = 4 * x.tokens * m.active_experts * m.fc1_width // t
    qkv_bias = 2 * x.tokens * m.qkv_width // t
    return e * (4 * norm_region + 6 * norm_region + qkv_bias + mlp + rope)


def layer_work(x: LayerShape, backward: bool) -> PassWork:
    """All work of one transformer layer's forward or backward on one rank."""
    gemms = _linear_gemms(x)
    work = PassWork(
        gemms=_backward_gemms(gemms) if backward else gemms,
        elementwise_bytes=_layer_elementwise(x) * (2 if backward else 1),
        comms=_tp_comms(x, backward),
    )
    work += attention_work(x, backward)
    return work


def _tp_region_comm(x: LayerShape, collective: str) -> CommOp:
    """One sequence gather / scatter / reduction of ``T D e`` over TP (``T_n`` shards)."""
    t, n = x.layout.tp, x.tokens * x.model.hidden_size * x.element_bytes
    if collective == "all_reduce":
        return CommOp("all_reduce", "tp", all_reduce_sent(n, t), steps=2 * (t - 1))
    sent = (all_gather_sent if collective == "all_gather" else reduce_scatter_sent)(n // t, t)
    return CommOp(collective, "tp", sent, steps=t - 1)


def embedding_work(x: LayerShape, backward: bool) -> PassWork:
    """The vocabulary-parallel embedding: its output is reduced over TP forward (all-reduce,
    or reduce-scatter into the sequence-parallel region, whose backward is an all-gather)."""
    if x.layout.tp == 1 or (backward and not x.layout.sequence_parallel):
        return PassWork()
    if x.layout.sequence_parallel:
        return PassWork(comms=[_tp_region_comm(x, "all_gather" if backward else "reduce_scatter")])
    return PassWork(comms=[_tp_region_comm(x, "all_reduce")])


def output_work(x: LayerShape, backward: bool) -> PassWork:
    """Final norm, the column-parallel output layer and the vocabulary-parallel cross entropy.

    TP: with sequence parallelism the output layer gathers its input forward and backward
    (again, for the weight gradient) and reduce-scatters the input gradient; without, it
    all-reduces the input gradient. The cross entropy all-reduces three fp32 values per token
    forward (max logit, sum of exponents, target logit).
    """
    m, t, e = x.model, x.layout.tp, x.element_bytes
    vocab = m.padded_vocab(t) // t if m.vocab_size else 0
    gemms = [(x.tokens, vocab, m.hidden_size)] if vocab else []
    logits = x.tokens * vocab * FP32_BYTES
    work = PassWork(
        gemms=_backward_gemms(gemms) if backward else gemms,
        elementwise_bytes=(2 * x.norm_tokens * m.hidden_size * e + 6 * logits)
        * (2 if backward else 1),
    )
    if t == 1:
        return work
    if x.layout.sequence_parallel:
        work.comms.append(_tp_region_comm(x, "all_gather"))
        if backward:
            work.comms.append(_tp_region_comm(x, "reduce_scatter"))
    elif backward:
        work.comms.append(_tp_region_comm(x, "all_reduce"))
    if not backward and vocab:
        work.comms.append(CommOp("all_reduce", "tp", 3 * all_reduce_sent(x.tokens * FP32_BYTES, t),
                                 calls=3, steps=2 * (t - 1)))
    return work


def pipeline_comms(x: LayerShape, stage: int, backward: bool) -> List[CommOp]:
    """Activation (forward, unless last stage) or its gradient (backward, unless first) of one
    micro-batch: ``T_n D e`` bytes to the neighbouring stage."""
    last = stage == x.layout.pp - 1
    if x.layout.pp == 1 or (stage == 0 and backward) or (last and not backward):
        return []
    return [CommOp("p2p", "pp", x.norm_tokens * x.model.hidden_size * x.element_bytes)]


def optimizer_bytes(params: int, param_bytes: int, mixed_precision: bool) -> float:
    """Adam step traffic: read gradient, read + write parameter and both fp32 moments (and the
    fp32 master copy with 16-bit parameters)."""
    master = 2 * FP32_BYTES if mixed_precision else 0
    return params * (FP32_BYTES + 2 * param_bytes + 4 * FP32_BYTES + master)


def decode_layer_work(x: LayerShape) -> PassWork:
    """One decode step of one layer: ``b`` new tokens (one per sequence) against a KV cache of
    ``s`` tokens. GEMMs have ``b`` rows (weight-bound on a GPU); attention reads the rank's
    cache, ``2 b s G d / t`` elements (helix: its KV heads x its dims, or ``1/m`` of the tokens
    at the full dim; plain TP with ``t > G`` one replicated KV head); TP all-reduces ``b D e``
    after the projection and fc2; helix's slice group adds ``_helix_decode_comms``."""
    m, t, b, s = x.model, x.layout.tp, x.micro_batch, x.seq_length
    routed = b * m.active_experts
    gemms = [(b, m.qkv_width // t, m.hidden_size), (b, m.hidden_size, m.context_width // t),
             (routed, m.fc1_width // t, m.hidden_size),
             (routed, m.hidden_size, m.ffn_hidden_size // t)]
    heads = m.num_attention_heads // t
    cache = 2 * b * s * kv_elements_per_token(m, x.layout) * x.element_bytes
    decode = AttentionWork("flash", 4.0 * b * heads * s * m.head_dim, (b * heads, 1, m.head_dim),
                           cache, backward=False)
    work = PassWork(gemms=gemms, attention=[decode])
    if t > 1:
        n = b * m.hidden_size * x.element_bytes
        work.comms.append(CommOp("all_reduce", "tp", 2 * all_reduce_sent(n, t), calls=2,
                                 steps=2 * (t - 1)))
    if x.layout.is_helix:
        work.comms.extend(_helix_decode_comms(x))
    return work


def _helix_decode_comms(x: LayerShape) -> List[CommOp]:
    """The slice group's part of a decode step in the mode ``--helix-decode auto`` resolves to
    for a cache of ``s`` tokens (``attention/decode_mode``): kv-parallel's all-gathers of the
    new q, k, v slices and of their fp32 LSE and reduce-scatter of the output (the same cache
    bytes and attention FLOPs per rank, ``1/m`` of the tokens at the full dim), or the slice
    path's score all-reduce."""
    m, layout, b = x.model, x.layout, x.micro_batch
    mm = layout.helix_m
    heads = m.num_attention_heads // layout.helix_n
    kv_heads = m.query_groups // layout.helix_n
    shape = SliceGroupShape(m=mm, batch=b, seq_q=1, seq_kv=x.seq_length, heads=heads,
                            kv_heads=kv_heads, slice_dim=m.head_dim // mm,
                            element_bytes=x.element_bytes)
    if choose_decode_mode("auto", shape) == "slices":
        scores = b * heads * x.seq_length * FP32_BYTES
        return [CommOp("all_reduce", "helix_slice", all_reduce_sent(scores, mm),
                       steps=2 * (mm - 1))]
    slice_bytes = b * shape.slice_dim * x.element_bytes
    return [
        CommOp("all_gather", "helix_slice",
               all_gather_sent((heads + 2 * kv_heads) * slice_bytes, mm), steps=mm - 1),
        CommOp("all_gather", "helix_slice", all_gather_sent(b * heads * FP32_BYTES, mm),
               steps=mm - 1),
        CommOp("reduce_scatter", "helix_slice", reduce_scatter_sent(heads * slice_bytes, mm),
               steps=mm - 1),
    ]

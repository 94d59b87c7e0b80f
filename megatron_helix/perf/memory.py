"""Bytes per rank of parameters, gradients, optimizer state, saved activations and KV cache.

By formula for any model size and layout, and by measurement on a small CPU run (the tensors
themselves; activations through ``torch.autograd.graph.saved_tensors_hooks``) so the formulas
are checked against what Megatron and the plugin actually keep. This is the project's one
activation-memory model: ``megatron-helix plan`` (``cost_model``) and the layer-wise planner
(``layerwise.stage_model``, which sets ``--pipeline-model-parallel-layout``) both price
activations and KV caches here; the planner passes its uneven layer counts as ``layers``.

Training state per parameter (``Precision``): the parameter, Megatron DDP's gradient buffer
(``main_grad``, fp32 with ``grad_reduce_in_fp32``) and Adam's state (two fp32 moments, plus an
fp32 master copy when parameters are 16-bit). With the distributed optimizer the Adam state is
sharded over the data-parallel (x context-parallel) ranks.

Saved activations of one layer and micro-batch (``T`` tokens on the rank's TP group,
``T_n = T / t`` with sequence parallelism else ``T``; ``e`` bytes per element; per-rank widths
are the full widths ``/ t``: ``q = H d / t``, ``kv = G d / t``):

- norms and residuals: the layer input, both norm outputs, the attention residual
  (``4 T_n D e``) and the norm statistics (fp32, two per token for LayerNorm, one for RMSNorm);
- MLP: the fc1 output and the activation output, ``T (F1 + F) / t e`` (``F1 = 2F`` gated);
- attention, by kernel (``calibration.ATTENTION_KERNELS``):
  ``unfused`` (Megatron's local ``DotProductAttention``): q, k and v expanded to the query
  heads (GQA; without GQA q and the fused QKV output that k and v view), the softmax
  ``b (H/t) s^2 e``, the context; plus one shared ``s x s`` bool mask;
  ``flash`` (ring attention, TE / flash kernels): q, the fused QKV output that k and v view,
  the output (the projection's input) and the fp32 LSE;
  ``score_allreduce`` (helix): like ``flash`` with the LSE of ``H/n`` heads over all tokens;
  ``redistribute`` (helix): q on ``s/m`` tokens, k and v gathered to full ``d``
  (``2 T G d / n``), the output before and after the return all-to-all, the LSE.
- RoPE: Megatron's unfused kernel (the local spec) saves cos and sin for q and for k,
  ``4 (s/R) d' e`` per layer (``d' = d / m`` under helix), and writes a rotated k that
  ``flash`` (without helix) and ``score_allreduce`` keep; fused kernels keep only the shared
  frequencies;
- the last stage adds the final norm and the fp32 softmax of the vocabulary-parallel cross
  entropy (``T V / t x 4``).

Small bookkeeping tensors (token ids, index lists, per-chunk masks of torch's CPU SDPA path)
are left out: ``tests/test_memory.py`` bounds what they add.

Inference keeps nothing for backward; ``live_activation_bytes`` bounds the tensors alive at
once in a forward pass. Unlike the saved activations it is not checked against a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Optional, Tuple

from megatron_helix.layerwise import ModelShape
from megatron_helix.perf.calibration import ATTENTION_KERNELS
from megatron_helix.perf.layouts import ParallelLayout

if TYPE_CHECKING:
    import torch

FP32 = 4
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
HELIX_KERNELS = {"allreduce": "score_allreduce", "redistribute": "redistribute"}


@dataclass(frozen=True)
class Precision:
    """Bytes per activation element and per parameter of each kind of training state."""

    activation_bytes: int
    param_bytes: int
    grad_bytes: int = FP32
    optimizer_bytes: int = 3 * FP32

    def __post_init__(self) -> None:
        for name in ("activation_bytes", "param_bytes", "grad_bytes", "optimizer_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def for_dtype(cls, dtype: str) -> "Precision":
        """Megatron mixed precision: 16-bit params and activations, fp32 ``main_grad``, Adam
        with an fp32 master copy; ``fp32``: no master copy. ``fp8`` keeps bf16 parameters
        (Transformer Engine casts per GEMM) and 1-byte activations where TE stores them."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {dtype!r} not in {tuple(DTYPE_BYTES)}")
        if dtype == "fp32":
            return cls(activation_bytes=FP32, param_bytes=FP32, optimizer_bytes=2 * FP32)
        return cls(activation_bytes=DTYPE_BYTES[dtype], param_bytes=2)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one rank holds in training, by kind."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class Kernels:
    """Which implementations run, which decides what is saved for backward.

    ``attention``: one of ``ATTENTION_KERNELS``, or None for what the plugin runs on a GPU for
    the layout (``flash`` unless helix slices heads without a ring, then the helix strategy's).
    ``unfused_rope``: Megatron's unfused RoPE (local spec) rather than a fused kernel.
    """

    attention: Optional[str] = None
    unfused_rope: bool = False

    def __post_init__(self) -> None:
        if self.attention is not None and self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {self.attention!r} not in {ATTENTION_KERNELS}")

    @classmethod
    def local_spec(cls, layout: ParallelLayout) -> "Kernels":
        """The plugin's trainer without Transformer Engine (CPU): Megatron's unfused
        ``DotProductAttention`` unless helix or the ring replace it, unfused RoPE."""
        plain = not layout.is_helix and layout.cp == 1
        return cls(attention="unfused" if plain else None, unfused_rope=True)

    def attention_for(self, layout: ParallelLayout) -> str:
        if self.attention is not None:
            return self.attention
        if layout.is_helix and layout.cp == 1:
            return HELIX_KERNELS[layout.score_strategy]
        return "flash"


def stage_layers(model: ModelShape, layout: ParallelLayout, stage: int) -> int:
    """Decoder layers on ``stage``: Megatron's even split (``layouts`` requires it)."""
    return model.num_layers // layout.pp


def stage_parameters(model: ModelShape, layout: ParallelLayout, stage: int) -> int:
    """Parameters one rank of pipeline ``stage`` holds (embedding first, output layer last;
    an untied output layer, or a tied one on a different stage, is its own tensor; RoPE has
    no parameters)."""
    t, last = layout.tp, stage == layout.pp - 1
    params = stage_layers(model, layout, stage) * model.layer_params(t)
    if model.vocab_size:
        if stage == 0:
            params += model.embedding_params(t)
        if last:
            shared = stage == 0 and not model.untie_embeddings_and_output_weights
            params += model.output_params(t) - (model.embedding_params(t) if shared else 0)
    return params


def _norm_stats(model: ModelShape, tokens: int) -> int:
    return tokens * FP32 * (2 if model.normalization == "LayerNorm" else 1)


def _rotated_key_kept(model: ModelShape, layout: ParallelLayout, kind: str) -> bool:
    """Unfused RoPE writes a new k; it is saved where the kernel reads k as it comes (GQA
    unfused attention saves its head-expanded copy instead; helix under a ring its all-to-all
    output)."""
    if kind == "unfused":
        return model.query_groups == model.num_attention_heads
    return kind == "score_allreduce" or (kind == "flash" and not layout.is_helix)


def attention_activation_bytes(model: ModelShape, layout: ParallelLayout, micro_batch: int,
                               seq_length: int, e: int, kernels: Kernels = Kernels()) -> int:
    """Saved tensors of one core attention (with its q/k/v inputs and output) per rank."""
    kind = kernels.attention_for(layout)
    t, n = layout.tp, layout.helix_n
    s = seq_length // layout.cp
    tokens = micro_batch * s
    q = tokens * model.context_width // t * e
    qkv = tokens * model.qkv_width // t * e
    lse = tokens * model.num_attention_heads // t * FP32  # fp32, one per head and token
    rotated_k = tokens * model.query_groups * model.head_dim // t * e
    extra = rotated_k if kernels.unfused_rope and _rotated_key_kept(model, layout, kind) else 0
    if kind == "unfused":
        softmax = micro_batch * model.num_attention_heads // t * s * s * e
        expanded = model.query_groups < model.num_attention_heads
        return (3 * q if expanded else q + qkv) + softmax + q + extra
    if kind == "flash":
        return q + qkv + q + lse + extra
    if kind == "score_allreduce":
        return q + qkv + q + tokens * (model.num_attention_heads // n) * FP32 + extra
    kv_gathered = 2 * tokens * model.query_groups * model.head_dim // n * e
    return q + kv_gathered + 2 * q + lse


def layer_activation_bytes(model: ModelShape, layout: ParallelLayout, micro_batch: int,
                           seq_length: int, e: int, kernels: Kernels = Kernels()) -> int:
    """Saved activations of one transformer layer and micro-batch on one rank."""
    t = layout.tp
    tokens = micro_batch * seq_length // layout.cp
    norm_tokens = tokens // t if layout.sequence_parallel else tokens
    norms = 4 * norm_tokens * model.hidden_size * e + 2 * _norm_stats(model, norm_tokens)
    mlp = model.active_experts * tokens * (model.fc1_width + model.ffn_hidden_size) // t * e
    rope = 4 * (seq_length // layout.cp) * (model.head_dim // layout.helix_m) * e
    attention = attention_activation_bytes(model, layout, micro_batch, seq_length, e, kernels)
    return norms + mlp + attention + (rope if kernels.unfused_rope else 0)


def output_activation_bytes(model: ModelShape, layout: ParallelLayout, micro_batch: int,
                            seq_length: int, e: int) -> int:
    """Last stage: final norm (input, statistics, output) and the cross entropy's fp32 softmax."""
    tokens = micro_batch * seq_length // layout.cp
    norm_tokens = tokens // layout.tp if layout.sequence_parallel else tokens
    norm = 2 * norm_tokens * model.hidden_size * e + _norm_stats(model, norm_tokens)
    vocab = model.padded_vocab(layout.tp) // layout.tp if model.vocab_size else 0
    softmax = tokens * vocab * FP32
    return norm + softmax


def in_flight_micro_batches(layout: ParallelLayout, stage: int, num_micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at its peak under 1F1B: ``p - stage``."""
    return min(layout.pp - stage, num_micro_batches)


def stage_activation_bytes(model: ModelShape, layout: ParallelLayout, stage: int,
                           micro_batch: int, seq_length: int, num_micro_batches: int, e: int,
                           kernels: Kernels = Kernels(), layers: Optional[int] = None) -> int:
    """Peak saved activations of one rank of ``stage``; unfused attention adds the one
    ``s x s`` bool mask its layers share. ``layers``: decoder layers on the stage, by default
    Megatron's even split (the layer-wise planner passes its uneven cuts)."""
    layers = stage_layers(model, layout, stage) if layers is None else layers
    per_micro = layers * layer_activation_bytes(model, layout, micro_batch, seq_length, e, kernels)
    if stage == layout.pp - 1:
        per_micro += output_activation_bytes(model, layout, micro_batch, seq_length, e)
    unfused = kernels.attention_for(layout) == "unfused"
    mask = (seq_length // layout.cp) ** 2 if unfused and layers else 0
    return in_flight_micro_batches(layout, stage, num_micro_batches) * per_micro + mask


def kv_cache_bytes(model: ModelShape, layout: ParallelLayout, batch: int, seq_length: int,
                   e: int, stage: int = 0, layers: Optional[int] = None,
                   kv_parallel: bool = False) -> int:
    """Inference KV cache of one rank: its layers x k and v of its KV heads x its dims x its
    tokens. Helix rank ``(g, j)`` caches KV groups of head group ``g`` restricted to slice
    ``j``: ``G/n`` heads of ``d/m`` dims, ``G d / t`` per token like TP, but for any ``t`` up to
    ``G m``, while plain TP with ``t > G`` replicates KV heads (``kv_elements_per_token``).
    With ``kv_parallel`` (``--helix-decode kv-parallel``) it
    caches every ``m``-th token of those ``G/n`` heads at the full ``d`` dims instead,
    ``ceil(s/m)`` tokens: the same ``2 s G d e / (m n)`` per layer when ``m`` divides ``s``.
    ``layers`` as in ``stage_activation_bytes``."""
    layers = stage_layers(model, layout, stage) if layers is None else layers
    tokens = seq_length // layout.cp
    if kv_parallel:
        m = layout.helix_m
        tokens = -(-tokens // m) * m
    return layers * batch * tokens * 2 * kv_elements_per_token(model, layout) * e


def kv_elements_per_token(model: ModelShape, layout: ParallelLayout) -> int:
    """Key (or value) elements one rank caches per token: ``G d / t``, its ``G/n`` KV heads x
    its ``d/m`` dims under helix; plain TP wider than the KV groups (``t > G``) gives every
    rank one whole KV head, each replicated on ``t / G`` ranks (Megatron's GQA rule)."""
    if layout.helix_m == 1 and layout.tp > model.query_groups:
        return model.head_dim
    return model.query_groups * model.head_dim // layout.tp


def live_activation_bytes(model: ModelShape, layout: ParallelLayout, tokens: int, e: int,
                          layers: int, last: bool) -> int:
    """Peak live activations of one rank in inference, where nothing is saved for backward:
    one layer's input, norm output and residual (``3 T D``, whole on every rank) beside its
    widest split intermediate, ``T max((H + 2G) d + H d, k (F1 + F)) / t``; or, on the last
    stage, the logits ``T V' / t`` if larger. ``T = tokens`` of one step (``b`` decoding,
    ``b s`` in a forward pass). A bound by formula, not checked against a measurement."""
    t = layout.tp
    widest = max(model.qkv_width + model.context_width,
                 model.active_experts * (model.fc1_width + model.ffn_hidden_size))
    layer = tokens * (3 * model.hidden_size + (widest + t - 1) // t) if layers else 0
    logits = tokens * (model.padded_vocab(t) // t) if last else 0
    return max(layer, logits) * e


def training_memory(model: ModelShape, layout: ParallelLayout, micro_batch: int,
                    seq_length: int, num_micro_batches: int, precision: Precision,
                    stage: Optional[int] = None, distributed_optimizer: bool = False,
                    kernels: Kernels = Kernels()) -> MemoryBreakdown:
    """Training memory of one rank of ``stage`` (default: the stage that needs the most)."""
    if stage is None:
        return max(
            (training_memory(model, layout, micro_batch, seq_length, num_micro_batches,
                             precision, s, distributed_optimizer, kernels)
             for s in range(layout.pp)),
            key=lambda breakdown: breakdown.total,
        )
    params = stage_parameters(model, layout, stage)
    shards = layout.dp * layout.cp if distributed_optimizer else 1
    return MemoryBreakdown(
        parameters=params * precision.param_bytes,
        gradients=params * precision.grad_bytes,
        optimizer=params * precision.optimizer_bytes // shards,
        activations=stage_activation_bytes(model, layout, stage, micro_batch, seq_length,
                                           num_micro_batches, precision.activation_bytes, kernels),
    )


# ----------------------------------------------------------------------------- measurement


def _storage_key(tensor: torch.Tensor) -> Tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    storages = {}
    for tensor in tensors:
        ptr, nbytes = _storage_key(tensor)
        if ptr:
            storages[ptr] = nbytes
    return sum(storages.values())


def measure_saved_activations(run: Callable[[], object],
                              exclude: Iterable[torch.Tensor] = ()) -> Tuple[int, object]:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` executes
    (a view counts its whole storage once), excluding the storages of ``exclude`` (the
    parameters: saved weights are not activations). Returns ``(bytes, run's result)``."""
    import torch  # measurement only: the formulas serve the planners without loading torch

    excluded = {_storage_key(t)[0] for t in exclude}
    saved: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage_key(tensor)
        if ptr and ptr not in excluded:
            saved[ptr] = nbytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return sum(saved.values()), result


def measure_training_state(model: torch.nn.Module, optimizer) -> MemoryBreakdown:
    """Parameters, gradient buffers (Megatron DDP's ``main_grad`` storages, else ``.grad``) and
    optimizer state (Adam moments and any master copies; 0-dim step counters left out) of one
    rank, from the tensors themselves. Call after one optimizer step (Adam state is lazy)."""
    import torch  # measurement only, as in measure_saved_activations

    params = [p for p in model.parameters()]
    param_storages = {_storage_key(p)[0] for p in params}
    grads = [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None
             else p.grad for p in params]
    state = []
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            state += [p for p in group["params"] if _storage_key(p)[0] not in param_storages]
        for entry in inner.state.values():
            state += [v for v in entry.values() if torch.is_tensor(v) and v.dim() > 0]
    return MemoryBreakdown(
        parameters=_unique_bytes(params),
        gradients=_unique_bytes(g for g in grads if g is not None),
        optimizer=_unique_bytes(state),
    )


def _torch_optimizers(optimizer) -> Iterable[torch.optim.Optimizer]:
    """The ``torch.optim`` optimizers inside a Megatron (possibly chained) optimizer."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield getattr(chained, "optimizer", chained)

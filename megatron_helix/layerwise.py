"""Layer-wise cache-aware partitioning: cut the decoder stack into stages that fit a budget.

Each pipeline stage runs on its own device (or on a tensor / helix group of ``t`` devices); the
planner chooses how many consecutive decoder layers each stage holds so that

1. every stage's working set fits a per-device budget (an L2 cache, shared memory or HBM), and
2. the slowest stage -- the largest per-stage cost, in FLOPs or in bytes -- is as small as possible.

The cut is exact: a dynamic program over contiguous partitions minimises the bottleneck (see
``_StageModel.partition``), so it is never worse than Megatron's even split when that fits.
When nothing fits, ``LayerwisePlanError`` states the layer's bytes, the budget, the budget this
layout would need and the smallest tensor (or helix) split that would fit.

Working-set formulas (bytes per device; ``t`` = tensor split, ``T`` = tokens per step, ``b``
micro-batch, ``s`` sequence length, ``D`` hidden, ``H`` heads, ``G`` KV groups, ``d`` head dim,
``F`` MLP width, ``F1 = 2F`` with a gated linear unit else ``F``, ``E`` experts, ``k`` top-k):

- weights of one decoder layer: ``[(H + 2G) d D + H d D + E (F1 + F) D] / t`` plus column biases
  ``/ t``, plus what every rank replicates: two norms, the row-parallel biases, the MoE router.
- ``weights`` mode: weights only (what the seed's "a layer fits L2" claim is about).
- ``decode``: weights + KV cache ``2 b s G d / t`` per layer + the live activations of one layer
  at ``T = b``: ``T (3D + max((H + 2G) d + H d, k (F1 + F)) / t)``.
- ``forward``: weights + live activations of one layer at ``T = b s`` (no cache kept).
- ``training``: weights + ``training_state_bytes_per_param`` per parameter (fp32 main grad, fp32
  master weight, Adam moments: 16 by default) + saved activations
  ``T [(4D + (H + 2G) d + H d + k (F1 + F)) bytes + 4H] / t`` per layer (flash attention, no
  dropout masks, sequence parallel when ``t > 1``) times the micro-batches in flight under
  1F1B, ``num_stages - stage_index``.
- The first stage also holds the embedding (a cache budget counts only the ``T`` rows a step
  reads; a memory budget the whole table), the last stage the final norm and output layer
  (and its logits). Vocabularies are padded as Megatron pads them.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from megatron_helix.layout import layout_errors

MODES = ("weights", "decode", "forward", "training")
COST_METRICS = ("flops", "bytes")
BUDGET_KINDS = ("cache", "memory")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
MAX_TENSOR_SPLIT = 4096


class LayerwisePlanError(ValueError):
    """No partition fits the budget.

    Attributes:
        plan: the partition that comes closest (smallest largest-stage working set).
        needed_budget: bytes per device that partition needs.
        min_tensor_split: the smallest legal tensor / helix split at which the same number of
            stages fits, or None when none up to ``MAX_TENSOR_SPLIT`` does.
    """

    def __init__(
        self, message: str, plan: "StagePlan", needed_budget: int, min_tensor_split: Optional[int]
    ):
        super().__init__(message)
        self.plan = plan
        self.needed_budget = needed_budget
        self.min_tensor_split = min_tensor_split


# ----------------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    """Bytes one device may spend on a stage's working set.

    ``kind`` says what must fit: ``"cache"`` (L2, shared memory) -- what one step touches, so an
    embedding lookup counts only the rows it reads; ``"memory"`` (HBM) -- what the stage keeps.
    """

    name: str
    bytes: int
    kind: str = "cache"

    def __post_init__(self) -> None:
        if self.bytes < 1:
            raise ValueError(f"budget {self.name!r} must be at least 1 byte, got {self.bytes}")
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind {self.kind!r} is not one of {BUDGET_KINDS}")

    def __str__(self) -> str:
        return f"{self.name} = {self.bytes:,} B ({_format_binary(self.bytes)}, {self.kind})"


_H100_SMS = 132  # H100 SXM and H200 SXM both enable 132 SMs.
_SMEM_PER_SM = 233_472  # 228 KiB (cudaDevAttrMaxSharedMemoryPerMultiprocessor on GH100)
_L2 = 52_428_800  # 50 MiB (cudaDevAttrL2CacheSize on H100 80GB HBM3 and H200)
_L2_PERSISTING = 39_321_600  # 37.5 MiB (cudaDevAttrMaxPersistingL2CacheSize reported for H100)

NAMED_BUDGETS: Dict[str, Budget] = {
    budget.name: budget
    for budget in (
        Budget("h100", _L2, "cache"),
        Budget("h100-l2", _L2, "cache"),
        Budget("h100-l2-persisting", _L2_PERSISTING, "cache"),
        Budget("h100-smem", _H100_SMS * _SMEM_PER_SM, "cache"),
        Budget("h100-hbm", 85_176_483_840, "memory"),  # totalGlobalMem of an H100 80GB HBM3
        Budget("h200", _L2, "cache"),
        Budget("h200-l2", _L2, "cache"),
        # Same GH100 L2 as the H100; query cudaDevAttrMaxPersistingL2CacheSize to confirm.
        Budget("h200-l2-persisting", _L2_PERSISTING, "cache"),
        Budget("h200-smem", _H100_SMS * _SMEM_PER_SM, "cache"),
        Budget("h200-hbm", 141_000_000_000, "memory"),  # the product's nominal 141 GB
    )
}

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_budget(value: Union[str, int, Budget], kind: str = "cache") -> Budget:
    """A ``Budget`` from a device name, a size with units, or a byte count.

    ``"h100"`` / ``"h200"`` are the 50 MiB L2; also ``-l2``, ``-l2-persisting``, ``-smem``, ``-hbm``
    (see ``NAMED_BUDGETS``). Sizes: ``"50MB"`` = 50 * 10^6, ``"50MiB"`` = 50 * 2^20, ``"80GB"``,
    ``"1.5GiB"``, ``"52428800"``. ``kind`` applies to sizes; named budgets know their kind.
    """
    if isinstance(value, Budget):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Budget("budget", value, kind)
    text = str(value).strip()
    if text.lower() in NAMED_BUDGETS:
        return NAMED_BUDGETS[text.lower()]
    match = _SIZE.match(text)
    unit = match and _UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise ValueError(
            f"cannot read budget {value!r}: give a size such as '50MB' (10^6 B), '50MiB' "
            f"(2^20 B), '80GB', '1.5GiB' or a byte count, or one of {sorted(NAMED_BUDGETS)}"
        )
    size = Fraction(match.group(1)) * unit
    if size.denominator != 1:
        raise ValueError(f"budget {value!r} is not a whole number of bytes ({float(size)})")
    return Budget(text, int(size), kind)


def _format_binary(count: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.4g} {unit}"
    return f"{count} B"


def format_bytes(count: float) -> str:
    """Decimal units, as the seeds and spec sheets write them: ``402.7 MB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{int(count)} B"


# ------------------------------------------------------------------------ model and workload


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True)
class ModelShape:
    """A GPT decoder stack, with Megatron's argument names and defaults.

    ``num_query_groups`` defaults to the head count (no GQA), ``kv_channels`` to
    ``hidden_size // num_attention_heads``. ``num_experts`` makes every MLP an MoE layer of that
    many experts of width ``ffn_hidden_size`` with top-``moe_router_topk`` routing.
    ``vocab_size=None`` leaves the embedding and output layer out of the working sets.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    vocab_size: Optional[int] = None
    gated_linear_unit: bool = False
    add_bias_linear: bool = True
    normalization: str = "LayerNorm"
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in (
                "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                "moe_router_topk", "make_vocab_size_divisible_by",
                "num_query_groups", "kv_channels", "num_experts", "vocab_size",
            )
            if getattr(self, name) is not None and getattr(self, name) < 1
        ]
        if not problems:
            if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
                problems.append(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; pass kv_channels"
                )
            if self.num_attention_heads % self.query_groups:
                problems.append(
                    f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                    f"num_query_groups {self.query_groups}"
                )
            if self.num_experts and self.moe_router_topk > self.num_experts:
                problems.append(
                    f"moe_router_topk {self.moe_router_topk} exceeds num_experts {self.num_experts}"
                )
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization {self.normalization!r} is not one of {NORMALIZATIONS}")
        if problems:
            raise ValueError("invalid model shape:\n  - " + "\n  - ".join(problems))

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def fc1_width(self) -> int:
        """Output width of the first MLP linear: ``2F`` with a gated linear unit (SwiGLU)."""
        return self.ffn_hidden_size * (2 if self.gated_linear_unit else 1)

    @property
    def active_experts(self) -> int:
        """MLPs each token passes through: top-k for MoE, else 1."""
        return self.moe_router_topk if self.num_experts else 1

    @property
    def qkv_width(self) -> int:
        return (self.num_attention_heads + 2 * self.query_groups) * self.head_dim

    @property
    def context_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def _norm_params(self) -> int:
        return self.hidden_size * (2 if self.normalization == "LayerNorm" else 1)

    def layer_params(self, tensor_split: int = 1) -> int:
        """Parameters one rank holds of one decoder layer at this tensor split."""
        D, F1 = self.hidden_size, self.fc1_width
        bias = self.add_bias_linear
        mlp = (F1 + self.ffn_hidden_size) * D
        # QKV is column-parallel (its bias splits), the projection row-parallel (bias replicated).
        split = (self.qkv_width + self.context_width) * D + (self.qkv_width if bias else 0)
        replicated = 2 * self._norm_params + (D if bias else 0)
        if self.num_experts:
            split += self.num_experts * (mlp + ((F1 + D) if bias else 0))  # experts, with biases
            replicated += self.num_experts * D  # router
        else:
            split += mlp + (F1 if bias else 0)  # fc1 column-parallel
            replicated += D if bias else 0  # fc2 row-parallel bias
        return _ceil_div(split, tensor_split) + replicated

    def padded_vocab(self, tensor_split: int = 1) -> int:
        """Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * t``."""
        multiple = self.make_vocab_size_divisible_by * tensor_split
        return _ceil_div(self.vocab_size or 0, multiple) * multiple

    def embedding_params(self, tensor_split: int = 1) -> int:
        return self.padded_vocab(tensor_split) * self.hidden_size // tensor_split

    def output_params(self, tensor_split: int = 1) -> int:
        """Final norm plus the output layer's vocabulary shard."""
        return self._norm_params + self.embedding_params(tensor_split)

    def matmul_params_per_token(self) -> int:
        """Weights one token multiplies through in a decoder layer (top-k experts for MoE)."""
        D = self.hidden_size
        router = D * self.num_experts if self.num_experts else 0
        mlp = self.active_experts * (self.fc1_width + self.ffn_hidden_size) * D
        return (self.qkv_width + self.context_width) * D + mlp + router


@dataclass(frozen=True)
class Workload:
    """What a stage runs, which decides what its working set holds (see the module docstring).

    ``mode``: ``"weights"`` (weights only), ``"decode"`` (one token per sequence against a KV
    cache of ``seq_length``), ``"forward"`` (inference over ``micro_batch_size x seq_length``
    tokens), ``"training"`` (1F1B forward + backward). ``dtype_bytes``: 2 for fp16/bf16.
    """

    mode: str
    micro_batch_size: int
    seq_length: int
    dtype_bytes: int = 2
    training_state_bytes_per_param: int = 16

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("micro_batch_size", "seq_length", "dtype_bytes")
            if getattr(self, name) < 1
        ]
        if self.training_state_bytes_per_param < 0:
            problems.append("training_state_bytes_per_param must be >= 0")
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {MODES}")
        if problems:
            raise ValueError("invalid workload:\n  - " + "\n  - ".join(problems))

    @property
    def tokens(self) -> int:
        """Tokens per step: one per sequence when decoding (or streaming weights), else ``b s``."""
        if self.mode in ("weights", "decode"):
            return self.micro_batch_size
        return self.micro_batch_size * self.seq_length

    @property
    def default_cost(self) -> str:
        """Decode steps are bandwidth-bound (bytes); prefill and training are compute-bound."""
        return "bytes" if self.mode in ("weights", "decode") else "flops"


# ---------------------------------------------------------------------------- stage model


@dataclass(frozen=True)
class StageWorkingSet:
    """Bytes one device of a stage needs.

    ``state_bytes`` is the KV cache (decode) or gradients + optimizer state (training).
    """

    weight_bytes: int
    state_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.state_bytes + self.activation_bytes


@dataclass(frozen=True)
class _StageModel:
    """Working set and cost of a stage holding ``n`` decoder layers at position ``index``."""

    model: ModelShape
    workload: Workload
    budget: Budget
    tensor_split: int
    num_stages: int
    cost_metric: str

    def working_set(self, index: int, num_layers: int) -> StageWorkingSet:
        m, w, t = self.model, self.workload, self.tensor_split
        first, last = index == 0, index == self.num_stages - 1
        tokens, dtype = w.tokens, w.dtype_bytes
        params = num_layers * m.layer_params(t)
        touched_embedding_rows = 0
        if last:
            params += m.output_params(t)
        if first and m.vocab_size and (m.untie_embeddings_and_output_weights or not last):
            if self.budget.kind == "cache":
                touched_embedding_rows = min(tokens, m.padded_vocab(t) // t) * m.hidden_size
            else:
                params += m.embedding_params(t)
        weights = (params + touched_embedding_rows) * dtype

        logits = tokens * (m.padded_vocab(t) // t) if last else 0
        state = activations = 0
        if w.mode == "decode":
            state = num_layers * _ceil_div(2 * w.micro_batch_size * w.seq_length
                                           * m.query_groups * m.head_dim, t) * dtype
        if w.mode in ("decode", "forward"):
            widest = max(m.qkv_width + m.context_width,
                         m.active_experts * (m.fc1_width + m.ffn_hidden_size))
            layer_live = tokens * (3 * m.hidden_size + _ceil_div(widest, t)) if num_layers else 0
            activations = max(layer_live, logits) * dtype
        if w.mode == "training":
            state = params * w.training_state_bytes_per_param
            saved_width = (4 * m.hidden_size + m.qkv_width + m.context_width
                           + m.active_experts * (m.fc1_width + m.ffn_hidden_size))
            saved_layer = _ceil_div(
                tokens * (saved_width * dtype + 4 * m.num_attention_heads), t
            )
            in_flight = self.num_stages - index  # 1F1B: stage i holds p - i micro-batches
            activations = in_flight * (num_layers * saved_layer + logits * 4)  # fp32 logits
        return StageWorkingSet(weights, state, activations)

    def flops(self, index: int, num_layers: int) -> int:
        """Forward FLOPs (x3 for training) of one micro-batch step on one device of the stage."""
        m, w, t = self.model, self.workload, self.tensor_split
        heads_dims = m.num_attention_heads * m.head_dim
        b, s = w.micro_batch_size, w.seq_length
        attention = {
            "weights": 0,
            "decode": 4 * b * s * heads_dims,  # q.k and p.v against s cached tokens
            "forward": 2 * b * s * (s + 1) * heads_dims,  # causal: (s + 1) / 2 keys per query
            "training": 2 * b * s * (s + 1) * heads_dims,
        }[w.mode]
        layer = 2 * w.tokens * m.matmul_params_per_token() + attention
        total = num_layers * _ceil_div(layer, t)
        if index == self.num_stages - 1 and m.vocab_size:
            total += _ceil_div(2 * w.tokens * m.padded_vocab(t) * m.hidden_size, t)
        return total * (3 if w.mode == "training" else 1)

    def cost(self, index: int, num_layers: int) -> int:
        if self.cost_metric == "flops":
            return self.flops(index, num_layers)
        return self.working_set(index, num_layers).total

    def min_layers(self, index: int) -> int:
        """Middle stages hold at least one layer; the ends may hold only the embedding / output."""
        return 0 if self.num_stages > 1 and index in (0, self.num_stages - 1) else 1

    def partition(self, key: Callable[[int, int], Optional[tuple]]) -> Optional[List[int]]:
        """Layer counts minimising ``max`` over stages of ``key(index, count)``, or None.

        Exact: ``best[j]`` after stage ``k`` is the smallest bottleneck with which stages
        ``0..k`` can hold layers ``0..j-1``; each step tries every size of stage ``k``.
        Keys are tuples compared lexicographically; ``None`` forbids a stage.
        O(num_stages * num_layers^2) key lookups.
        """
        n_layers = self.model.num_layers
        best: List[Optional[tuple]] = [()] + [None] * n_layers
        choices: List[List[int]] = []
        for index in range(self.num_stages):
            keys = [
                key(index, count) if count >= self.min_layers(index) else None
                for count in range(n_layers + 1)
            ]
            new_best: List[Optional[tuple]] = [None] * (n_layers + 1)
            choice = [0] * (n_layers + 1)
            for end in range(n_layers + 1):
                for start in range(end + 1):
                    stage_key = keys[end - start]
                    if best[start] is None or stage_key is None:
                        continue
                    value = max(best[start], stage_key)
                    if new_best[end] is None or value < new_best[end]:
                        new_best[end], choice[end] = value, start
            best = new_best
            choices.append(choice)
        if best[n_layers] is None:
            return None
        counts, end = [], n_layers
        for choice in reversed(choices):
            counts.append(end - choice[end])
            end = choice[end]
        return counts[::-1]

    def fits_key(self, index: int, count: int) -> Optional[Tuple[int, int]]:
        """(cost, bytes) of a stage that fits the budget; None if it does not."""
        total = self.working_set(index, count).total
        return (self.cost(index, count), total) if total <= self.budget.bytes else None

    def bytes_key(self, index: int, count: int) -> Tuple[int]:
        return (self.working_set(index, count).total,)

    def plan(self, counts: Sequence[int]) -> "StagePlan":
        stages, first_layer = [], 0
        for index, count in enumerate(counts):
            working_set = self.working_set(index, count)
            stages.append(Stage(
                index=index,
                first_layer=first_layer,
                num_layers=count,
                working_set=working_set,
                cost=self.cost(index, count),
                fits=working_set.total <= self.budget.bytes,
            ))
            first_layer += count
        helix = split_layout(self.model, self.tensor_split)
        return StagePlan(self.model, self.workload, self.budget, self.tensor_split,
                         self.cost_metric, tuple(stages), helix)


# ----------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Stage:
    """Decoder layers ``[first_layer, first_layer + num_layers)`` on one pipeline rank.

    Stage 0 also holds the embedding, the last stage the final norm and output layer.
    """

    index: int
    first_layer: int
    num_layers: int
    working_set: StageWorkingSet
    cost: int
    fits: bool

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


@dataclass(frozen=True)
class StagePlan:
    """Contiguous stages covering every decoder layer once, with Megatron's way to run them.

    ``helix`` is ``(m, n)`` when the tensor split needs a helix layout (``m > 1``), else None
    (plain tensor parallelism). Validates its own invariants.
    """

    model: ModelShape
    workload: Workload
    budget: Budget
    tensor_split: int
    cost_metric: str
    stages: Tuple[Stage, ...]
    helix: Optional[Tuple[int, int]] = None

    def __post_init__(self) -> None:
        problems, expected_first = [], 0
        for position, stage in enumerate(self.stages):
            if stage.index != position or stage.first_layer != expected_first:
                problems.append(f"stage {position} is out of order or not contiguous: {stage}")
            if stage.num_layers < 0 or (
                stage.num_layers == 0 and 0 < position < len(self.stages) - 1
            ):
                problems.append(f"middle stage {position} holds no decoder layer")
            if stage.fits != (stage.working_set.total <= self.budget.bytes):
                problems.append(f"stage {position} fits flag disagrees with the budget")
            expected_first += stage.num_layers
        if not self.stages or expected_first != self.model.num_layers:
            problems.append(
                f"stages hold {expected_first} decoder layers, the model {self.model.num_layers}"
            )
        if problems:
            raise ValueError("invalid stage plan:\n  - " + "\n  - ".join(problems))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def world_size(self) -> int:
        """Devices the plan occupies (one data-parallel replica)."""
        return self.num_stages * self.tensor_split

    @property
    def layer_counts(self) -> List[int]:
        return [stage.num_layers for stage in self.stages]

    @property
    def fits(self) -> bool:
        return all(stage.fits for stage in self.stages)

    @property
    def max_cost(self) -> int:
        return max(stage.cost for stage in self.stages)

    @property
    def max_bytes(self) -> int:
        return max(stage.working_set.total for stage in self.stages)

    @property
    def pipeline_layout(self) -> str:
        """megatron-core's ``pipeline_model_parallel_layout`` string, e.g. ``"Et*3|t*4|t*5L"``."""
        stages = []
        for stage in self.stages:
            layers = {0: "", 1: "t"}.get(stage.num_layers, f"t*{stage.num_layers}")
            stages.append(
                ("E" if stage.index == 0 else "") + layers
                + ("L" if stage.index == self.num_stages - 1 else "")
            )
        return "|".join(stages)

    @property
    def transformer_config_kwargs(self) -> Dict[str, object]:
        """Keyword arguments for megatron-core 0.16.1's ``TransformerConfig``.

        The trainer adds the rest (``num_layers`` must equal the layout's decoder count and
        ``pipeline_dtype`` is required whenever the pipeline has more than one stage).
        """
        kwargs: Dict[str, object] = {
            "tensor_model_parallel_size": self.tensor_split,
            "pipeline_model_parallel_size": self.num_stages,
        }
        if self.num_stages > 1:
            kwargs["pipeline_model_parallel_layout"] = self.pipeline_layout
        return kwargs

    @property
    def first_last_kwargs(self) -> Optional[Dict[str, int]]:
        """The same cut as ``num_layers_in_{first,last}_pipeline_stage``, when that can say it.

        Megatron's older uneven-pipeline knobs need non-empty end stages and equal middles.
        """
        counts = self.layer_counts
        if self.num_stages < 2 or 0 in counts or len(set(counts[1:-1])) > 1:
            return None
        return {
            "num_layers_in_first_pipeline_stage": counts[0],
            "num_layers_in_last_pipeline_stage": counts[-1],
        }

    @property
    def megatron_args(self) -> List[str]:
        """Megatron-LM command-line arguments (``pretrain_gpt.py``) for this plan."""
        args = ["--tensor-model-parallel-size", str(self.tensor_split),
                "--pipeline-model-parallel-size", str(self.num_stages)]
        if self.num_stages > 1:
            args += ["--pipeline-model-parallel-layout", self.pipeline_layout]
        if self.helix:
            args += ["--helix-m", str(self.helix[0]), "--helix-n", str(self.helix[1])]
        return args


def split_layout(model: ModelShape, tensor_split: int) -> Optional[Tuple[int, int]]:
    """How ``tensor_split`` ranks can share each layer: None for plain TP, else helix ``(m, n)``.

    Plain tensor parallelism needs the split to divide the heads and KV groups. Otherwise a
    helix layout ``m * n`` with ``n`` dividing the KV groups (as many head groups as possible,
    keeping slice traffic small) and ``m`` slicing the head dim (rotate-half RoPE) may work.
    Raises ValueError when neither does.
    """
    heads, groups = model.num_attention_heads, model.query_groups
    if tensor_split < 1:
        raise ValueError(f"tensor split must be >= 1, got {tensor_split}")
    if heads % tensor_split == 0 and groups % tensor_split == 0:
        return None
    for n in sorted((n for n in range(1, groups + 1) if groups % n == 0), reverse=True):
        m = tensor_split // n
        if tensor_split % n == 0 and not layout_errors(m, n, heads, groups, model.head_dim):
            return (m, n)
    raise ValueError(
        f"tensor split {tensor_split} fits neither tensor parallelism ({heads} heads, {groups} "
        f"KV groups) nor a helix m x n layout (head dim {model.head_dim})"
    )


def _is_legal_split(model: ModelShape, tensor_split: int) -> bool:
    try:
        split_layout(model, tensor_split)
    except ValueError:
        return False
    return True


def _stage_model(model, workload, num_stages, budget, tensor_split, cost) -> _StageModel:
    cost = cost or workload.default_cost
    if cost not in COST_METRICS:
        raise ValueError(f"cost {cost!r} is not one of {COST_METRICS}")
    if not 1 <= num_stages <= model.num_layers + (2 if num_stages > 1 else 0):
        raise ValueError(
            f"{num_stages} pipeline stages cannot hold {model.num_layers} decoder layers: middle "
            f"stages need at least one (at most {model.num_layers + 2} stages)"
        )
    split_layout(model, tensor_split)
    return _StageModel(model, workload, parse_budget(budget), tensor_split, num_stages, cost)


def plan_layerwise(
    model: ModelShape,
    workload: Workload,
    num_stages: int,
    budget: Union[Budget, str, int],
    tensor_split: int = 1,
    cost: Optional[str] = None,
) -> StagePlan:
    """The contiguous cut into ``num_stages`` stages that fits ``budget`` with the smallest
    bottleneck (largest per-stage ``cost``: ``"flops"`` or ``"bytes"``, by default chosen from
    the mode); among equal bottlenecks, the one whose bottleneck stage needs fewer bytes.

    Raises ``LayerwisePlanError`` when no cut fits.
    """
    stage_model = _stage_model(model, workload, num_stages, budget, tensor_split, cost)
    counts = stage_model.partition(stage_model.fits_key)
    if counts is None:
        raise _refusal(stage_model)
    return stage_model.plan(counts)


def evaluate_layout(
    model: ModelShape,
    workload: Workload,
    layer_counts: Sequence[int],
    budget: Union[Budget, str, int],
    tensor_split: int = 1,
    cost: Optional[str] = None,
) -> StagePlan:
    """The plan for a given cut (decoder layers per stage), fitting or not: how an existing
    layout fares against a budget."""
    stage_model = _stage_model(model, workload, len(layer_counts), budget, tensor_split, cost)
    return stage_model.plan(layer_counts)


def even_split(
    model: ModelShape,
    workload: Workload,
    num_stages: int,
    budget: Union[Budget, str, int],
    tensor_split: int = 1,
    cost: Optional[str] = None,
) -> StagePlan:
    """Megatron's default: ``num_layers / num_stages`` layers per stage (must divide)."""
    if model.num_layers % num_stages:
        raise ValueError(
            f"Megatron's even split needs num_layers {model.num_layers} divisible by "
            f"{num_stages} stages"
        )
    counts = [model.num_layers // num_stages] * num_stages
    return evaluate_layout(model, workload, counts, budget, tensor_split, cost)


def plan_for_world(
    model: ModelShape,
    workload: Workload,
    world_size: int,
    budget: Union[Budget, str, int],
    cost: Optional[str] = None,
) -> StagePlan:
    """Use ``world_size`` devices as ``pipeline x tensor split``, smallest split that fits first.

    A smaller split means less intra-layer communication; pipelining is tried as deep as the
    layer count allows before layers are split.
    """
    attempts: List[Tuple[int, LayerwisePlanError]] = []
    for split in range(1, world_size + 1):
        stages = world_size // split
        if world_size % split or stages > model.num_layers + 2 or not _is_legal_split(model, split):
            continue
        try:
            return plan_layerwise(model, workload, stages, budget, split, cost)
        except LayerwisePlanError as error:
            attempts.append((split, error))
    if not attempts:
        raise ValueError(f"no pipeline x tensor layout of {world_size} devices suits this model")
    lines = [
        f"no layout of {world_size} devices fits {parse_budget(budget)} in {workload.mode!r} mode:"
    ]
    for split, error in attempts:
        nearest = (f"fits with tensor split {error.min_tensor_split} "
                   f"({error.plan.num_stages * error.min_tensor_split} devices)"
                   if error.min_tensor_split else "no split fits")
        lines.append(
            f"  - pipeline {error.plan.num_stages} x tensor split {split}: needs "
            f"{format_bytes(error.needed_budget)} per device; {nearest}"
        )
    closest = min((error for _, error in attempts), key=lambda error: error.needed_budget)
    raise LayerwisePlanError("\n".join(lines), closest.plan, closest.needed_budget,
                             closest.min_tensor_split)


def _fits_anywhere(stage_model: _StageModel) -> bool:
    feasible = stage_model.partition(lambda i, n: (0,) if stage_model.fits_key(i, n) else None)
    return feasible is not None


def _smallest_fitting_split(stage_model: _StageModel) -> Optional[int]:
    """Binary search over legal splits: every working-set term shrinks as the split grows."""
    candidates = [
        split for split in range(stage_model.tensor_split + 1, MAX_TENSOR_SPLIT + 1)
        if _is_legal_split(stage_model.model, split)
    ]
    low, high, found = 0, len(candidates) - 1, None
    while low <= high:
        middle = (low + high) // 2
        probe = _StageModel(stage_model.model, stage_model.workload, stage_model.budget,
                            candidates[middle], stage_model.num_stages, stage_model.cost_metric)
        if _fits_anywhere(probe):
            found, high = candidates[middle], middle - 1
        else:
            low = middle + 1
    return found


def _refusal(stage_model: _StageModel) -> LayerwisePlanError:
    model, budget, split = stage_model.model, stage_model.budget, stage_model.tensor_split
    dtype = stage_model.workload.dtype_bytes
    closest = stage_model.plan(stage_model.partition(stage_model.bytes_key))
    needed = closest.max_bytes
    worst = max(closest.stages, key=lambda stage: stage.working_set.total)
    layer_bytes = model.layer_params(split) * dtype
    min_split = _smallest_fitting_split(stage_model)
    unique_params = model.num_layers * model.layer_params() + model.output_params() + (
        model.embedding_params() if model.untie_embeddings_and_output_weights else 0)
    model_weights = unique_params * dtype
    holders = [
        name for name, named in NAMED_BUDGETS.items()
        if named.kind == budget.kind and named.bytes >= needed
    ]
    lines = [
        f"no cut of {model.num_layers} decoder layers into {stage_model.num_stages} pipeline "
        f"stages at tensor split {split} fits {budget} per device "
        f"({stage_model.workload.mode!r} mode).",
        f"  - one decoder layer holds {format_bytes(layer_bytes)} of weights at tensor split "
        f"{split} ({layer_bytes / budget.bytes:.2f}x the budget)",
        f"  - the closest cut {closest.layer_counts} needs {format_bytes(needed)} "
        f"({needed:,} B) per device, at stage {worst.index}; a budget that large would fit"
        + (f" (e.g. {', '.join(holders)})" if holders else ""),
    ]
    if min_split:
        layout = split_layout(model, min_split)
        how = f"helix m={layout[0]} x n={layout[1]}" if layout else f"TP={min_split}"
        lines.append(
            f"  - smallest tensor split that fits {stage_model.num_stages} stages: {min_split} "
            f"({how}), i.e. {stage_model.num_stages * min_split} devices"
        )
    else:
        lines.append(f"  - no tensor split up to {MAX_TENSOR_SPLIT} fits "
                     f"{stage_model.num_stages} stages")
    lines.append(
        f"  - the weights alone ({format_bytes(model_weights)} unsplit) need at least "
        f"{math.ceil(model_weights / budget.bytes)} devices of this budget"
    )
    return LayerwisePlanError("\n".join(lines), closest, needed, min_split)


def plan_from_args(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: int,
    seq_length: int,
    micro_batch_size: int,
    budget: Union[Budget, str, int],
    budget_kind: str = "cache",
    pipeline_model_parallel_size: Optional[int] = None,
    tensor_model_parallel_size: int = 1,
    world_size: Optional[int] = None,
    mode: str = "training",
    num_query_groups: Optional[int] = None,
    kv_channels: Optional[int] = None,
    num_experts: Optional[int] = None,
    moe_router_topk: int = 2,
    vocab_size: Optional[int] = None,
    gated_linear_unit: bool = False,
    add_bias_linear: bool = True,
    normalization: str = "LayerNorm",
    untie_embeddings_and_output_weights: bool = False,
    dtype_bytes: int = 2,
    cost: Optional[str] = None,
) -> StagePlan:
    """The planner behind ``--helix-layerwise --helix-cache-budget 50MB``, in Megatron's names.

    Give ``pipeline_model_parallel_size`` (with ``tensor_model_parallel_size``) to fix the
    layout, or ``world_size`` to let the planner pick the smallest tensor split that fits.
    ``budget`` is a ``Budget``, a byte count or a string for ``parse_budget``; ``budget_kind``
    (``"cache"`` or ``"memory"``) applies to sizes, named budgets know theirs. Returns the plan;
    ``plan.transformer_config_kwargs`` go into ``TransformerConfig``. Raises
    ``LayerwisePlanError`` when nothing fits.
    """
    if (pipeline_model_parallel_size is None) == (world_size is None):
        raise ValueError("give exactly one of pipeline_model_parallel_size and world_size")
    model = ModelShape(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size, num_query_groups=num_query_groups,
        kv_channels=kv_channels, num_experts=num_experts, moe_router_topk=moe_router_topk,
        vocab_size=vocab_size, gated_linear_unit=gated_linear_unit,
        add_bias_linear=add_bias_linear, normalization=normalization,
        untie_embeddings_and_output_weights=untie_embeddings_and_output_weights,
    )
    workload = Workload(mode, micro_batch_size, seq_length, dtype_bytes)
    budget = parse_budget(budget, budget_kind)
    if world_size is not None:
        return plan_for_world(model, workload, world_size, budget, cost)
    return plan_layerwise(model, workload, pipeline_model_parallel_size, budget,
                          tensor_model_parallel_size, cost)


# ------------------------------------------------------------------------------ reporting


def _format_cost(plan: StagePlan, cost: int) -> str:
    if plan.cost_metric == "bytes":
        return format_bytes(cost)
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if cost >= scale:
            return f"{cost / scale:.2f} {unit}"
    return f"{cost} FLOP"


def format_plan(plan: StagePlan) -> str:
    """A readable table of the plan, with Megatron's even split for comparison when it exists."""
    m, w = plan.model, plan.workload
    split = f"helix {plan.helix[0]}x{plan.helix[1]}" if plan.helix else f"TP {plan.tensor_split}"
    state_label = {"decode": "kv cache", "training": "grad+optim"}.get(w.mode, "state")
    lines = [
        f"layer-wise plan: {m.num_layers} decoder layers -> {plan.num_stages} stages x {split} "
        f"({plan.world_size} devices), mode {w.mode}, {w.dtype_bytes} B/element, "
        f"micro-batch {w.micro_batch_size} x seq {w.seq_length}",
        f"budget {plan.budget}; balanced by {plan.cost_metric}",
        f"{'stage':>5}  {'layers':<14}{'weights':>10}{state_label:>11}{'activations':>13}"
        f"{'total':>11}  {'fits':<5}{'cost':>16}",
    ]
    for stage in plan.stages:
        span = (f"{stage.first_layer}-{stage.layers[-1]}" if stage.num_layers > 1
                else str(stage.first_layer) if stage.num_layers else "")
        ends = ["E"] * (stage.index == 0) + [span] * bool(span) + ["L"] * (
            stage.index == plan.num_stages - 1)
        ws = stage.working_set
        lines.append(
            f"{stage.index:>5}  {'+'.join(ends):<14}{format_bytes(ws.weight_bytes):>10}"
            f"{format_bytes(ws.state_bytes):>11}{format_bytes(ws.activation_bytes):>13}"
            f"{format_bytes(ws.total):>11}  {'yes' if stage.fits else 'NO':<5}"
            f"{_format_cost(plan, stage.cost):>16}"
        )
    lines.append(f"bottleneck: {_format_cost(plan, plan.max_cost)} per step; largest working set "
                 f"{format_bytes(plan.max_bytes)}; fits: {'yes' if plan.fits else 'NO'}")
    if m.num_layers % plan.num_stages == 0:
        even = even_split(m, w, plan.num_stages, plan.budget, plan.tensor_split, plan.cost_metric)
        lines.append(f"Megatron even split {even.layer_counts[0]} x {plan.num_stages}: bottleneck "
                     f"{_format_cost(even, even.max_cost)}, largest working set "
                     f"{format_bytes(even.max_bytes)}, fits: {'yes' if even.fits else 'NO'}")
    kwargs = ", ".join(f"{key}={value!r}" for key, value in plan.transformer_config_kwargs.items())
    lines.append(f"TransformerConfig({kwargs})")
    lines.append(f"Megatron-LM flags: {shlex.join(plan.megatron_args)}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_helix.layerwise",
        description="Cut a GPT decoder stack into pipeline stages that fit a per-device budget.",
    )
    size = parser.add_argument_group("model (Megatron-LM names)")
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size",
                 "--seq-length", "--micro-batch-size"):
        size.add_argument(flag, type=int, required=True)
    for flag in ("--num-query-groups", "--kv-channels", "--num-experts", "--vocab-size"):
        size.add_argument(flag, type=int)
    size.add_argument("--moe-router-topk", type=int, default=2)
    size.add_argument("--swiglu", dest="gated_linear_unit", action="store_true")
    size.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    size.add_argument("--normalization", choices=NORMALIZATIONS, default="LayerNorm")
    size.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    size.add_argument("--dtype-bytes", type=int, default=2, help="2 for fp16/bf16, 4 for fp32")
    plan = parser.add_argument_group("plan")
    plan.add_argument("--mode", choices=MODES, required=True)
    plan.add_argument("--budget", required=True,
                      help=f"'50MB', '50MiB', '80GB', bytes, or one of {sorted(NAMED_BUDGETS)}")
    plan.add_argument("--budget-kind", choices=BUDGET_KINDS, default="cache",
                      help="what a size budget bounds: a cache (what one step touches) or "
                           "memory (what the stage keeps); named budgets know theirs")
    plan.add_argument("--cost", choices=COST_METRICS)
    layout = plan.add_mutually_exclusive_group(required=True)
    layout.add_argument("--pipeline-model-parallel-size", type=int)
    layout.add_argument("--world-size", type=int)
    plan.add_argument("--tensor-model-parallel-size", type=int, default=1)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the plan; exit status 1 (with the closest plan and the reasons) when nothing fits."""
    args = vars(_parser().parse_args(argv))
    try:
        print(format_plan(plan_from_args(**args)))
        return 0
    except LayerwisePlanError as error:
        print(format_plan(error.plan))
        print(f"REFUSED: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The per-layer working-set model: a decoder stack's shape, what a stage runs, its formulas.

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

``stage_model._StageModel`` evaluates them for one stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MODES = ("weights", "decode", "forward", "training")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")


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

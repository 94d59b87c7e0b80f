"""The shape of a GPT decoder stack and its parameter counts per rank.

``ModelShape`` speaks Megatron's argument names. Every memory model prices a stack through it:
``perf.memory`` (parameters, activations, KV cache per rank of a layout) and the layer-wise
planner (``stage_model``, which cuts the stack into stages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_helix.layerwise.problems import below_one, raise_problems

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def ceil_div(numerator: int, denominator: int) -> int:
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
        problems = below_one(self, (
            "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
            "moe_router_topk", "make_vocab_size_divisible_by",
            "num_query_groups", "kv_channels", "num_experts", "vocab_size",
        ))
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
        raise_problems("model shape", problems)

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
        return ceil_div(split, tensor_split) + replicated

    def padded_vocab(self, tensor_split: int = 1) -> int:
        """Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * t``."""
        multiple = self.make_vocab_size_divisible_by * tensor_split
        return ceil_div(self.vocab_size or 0, multiple) * multiple

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

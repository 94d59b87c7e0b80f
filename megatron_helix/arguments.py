"""Command-line flags for helix, ring and layer-wise parallelism, and their translation into
Megatron's own parallel sizes.

The helix group *is* Megatron's tensor-parallel group and the ring *is* its context-parallel
group, so the flags do not add new sizes next to Megatron's: ``apply_helix_args`` rewrites
``--tensor-model-parallel-size`` and ``--context-parallel-size`` from them *before* Megatron's
``validate_args`` derives the data-parallel size, the sequence-parallel switch and the expert
sizes from those two numbers. Everything is reported at once, each problem naming the flags, the
numbers and a value that works, identically on every rank, before any process group exists.

Used by Megatron-LM (``patches/``, ``megatron_helix.launch``) and by the plugin's own trainer;
both parsers use Megatron's flag names, so attributes a parser does not define are read as
Megatron's defaults (feature off).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Callable, List, Optional

from megatron_helix.attention.strategy import STRATEGIES
from megatron_helix.parallel_dims import HelixConfigError, HelixParallelDims

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"50MB"`` -> 50_000_000, ``"50MiB"`` -> 52_428_800: decimal SI and binary IEC units.

    Both spellings exist because vendors quote caches in either; the plugin never guesses.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: write a number with an optional unit, e.g. 50MB (10^6 "
            f"bytes) or 40MiB (2^20 bytes); units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def add_helix_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the helix argument group; returns the parser (Megatron's ``extra_args_provider``)."""
    group = parser.add_argument_group(
        title="helix",
        description="Helix attention (heads x head-dim partitioning on the tensor-parallel "
        "group), ring attention on the context-parallel group, layer-wise stages.",
    )
    group.add_argument(
        "--helix-m", type=int, default=1,
        help="Dim slices per attention head. --helix-m x --helix-n ranks form the helix group, "
        "which becomes the tensor-model-parallel size.",
    )
    group.add_argument(
        "--helix-n", type=int, default=1,
        help="Head groups; must divide the number of attention heads and of query groups.",
    )
    group.add_argument(
        "--helix-ring-size", type=int, default=1,
        help="Ranks in the attention ring (sequence split R ways); becomes the "
        "context-parallel size. Uses the plugin's ring attention, no Transformer Engine needed.",
    )
    group.add_argument(
        "--helix-score-strategy", choices=STRATEGIES, default="auto",
        help="How the m dim slices of a head combine attention scores: 'allreduce' (partial "
        "scores; cheap for short queries), 'redistribute' (all-to-all to whole heads; for long "
        "prefill and training) or 'auto' (fewer bytes for the shapes at hand).",
    )
    group.add_argument(
        "--helix-layerwise", action="store_true",
        help="Layer-wise pipeline stages: one transformer layer per pipeline stage unless "
        "--pipeline-model-parallel-size says otherwise.",
    )
    group.add_argument(
        "--helix-cache-budget", type=parse_bytes, default=None, metavar="SIZE",
        help="Per-device cache budget of a layer-wise stage, e.g. 50MB or 40MiB (needs "
        "--helix-layerwise). Stored in bytes.",
    )
    return parser


def helix_args_provider(chained: Optional[ArgsProvider] = None) -> ArgsProvider:
    """An ``extra_args_provider`` adding the helix flags after ``chained``'s (if any)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if chained is not None:
            parser = chained(parser)
        return add_helix_args(parser)

    return provider


def uses_helix(args: argparse.Namespace) -> bool:
    """Whether the model needs helix attention: a helix group or a ring was asked for."""
    helix = getattr(args, "helix_m", 1) * getattr(args, "helix_n", 1)
    return helix > 1 or getattr(args, "helix_ring_size", 1) > 1


def rope_pairing_from_args(args: argparse.Namespace) -> str:
    """Which head dims RoPE rotates together, from Megatron's position-embedding flags."""
    kind = getattr(args, "position_embedding_type", "learned_absolute")
    if getattr(args, "use_rotary_position_embeddings", False):  # Megatron's deprecated alias
        kind = "rope"
    if kind != "rope":
        return "none"
    return "interleaved" if getattr(args, "rotary_interleaved", False) else "rotate_half"


# Megatron features that replace or bypass the attention the helix spec provides:
# (attribute, flag, why). Set means anything but Megatron's default (None / False).
_INCOMPATIBLE = (
    ("use_legacy_models", "--use-legacy-models", "helix attention is a megatron-core spec"),
    ("multi_latent_attention", "--multi-latent-attention", "MLA has its own projections"),
    ("experimental_attention_variant", "--experimental-attention-variant",
     "it replaces the attention spec"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path",
     "it replaces the layer spec"),
    ("mtp_num_layers", "--mtp-num-layers", "multi-token-prediction layers are not helix layers"),
    ("hybrid_context_parallel", "--hybrid-context-parallel",
     "the helix ring is one flat context-parallel group"),
    ("hierarchical_context_parallel_sizes", "--hierarchical-context-parallel-sizes",
     "the helix ring is one flat context-parallel group"),
)


def _incompatibility_errors(args: argparse.Namespace) -> List[str]:
    problems = [
        f"{flag} cannot be combined with helix attention: {why}"
        for attr, flag, why in _INCOMPATIBLE
        if getattr(args, attr, None) not in (None, False)
    ]
    if getattr(args, "transformer_impl", "local") == "inference_optimized":
        problems.append(
            "--transformer-impl inference_optimized has no helix spec; use local or "
            "transformer_engine"
        )
    if getattr(args, "moe_layer_freq", 1) not in (1, None):
        problems.append(
            f"--moe-layer-freq {args.moe_layer_freq}: the helix layer spec makes every layer "
            f"MoE when --num-experts is set; drop --moe-layer-freq"
        )
    spec = getattr(args, "spec", None)
    if spec and not spec[0].startswith("megatron_helix"):
        problems.append(
            f"--spec {' '.join(spec)} would replace the helix layer spec; drop --spec (the "
            f"helix flags choose the spec) or use one from megatron_helix.specs"
        )
    kind = getattr(args, "position_embedding_type", "learned_absolute")
    if kind in ("mrope", "relative"):
        problems.append(
            f"--position-embedding-type {kind} is not supported with helix attention; "
            f"use rope, learned_absolute or none"
        )
    rotary_percent = getattr(args, "rotary_percent", 1.0)
    if args.helix_m > 1 and rope_pairing_from_args(args) != "none" and rotary_percent != 1.0:
        problems.append(
            f"--rotary-percent {rotary_percent} with --helix-m {args.helix_m}: a dim slice "
            f"must hold whole RoPE pairs of a fully rotated head; use --rotary-percent 1.0 "
            f"or --helix-m 1"
        )
    return problems


def _contradiction(flag: str, given: int, wanted: int, because: str, meaning: str) -> List[str]:
    """Megatron's size ``given`` (1 = not given) must agree with the helix-derived ``wanted``."""
    if given in (1, wanted):
        return []
    return [
        f"{flag} {given} contradicts {because} = {wanted} ({meaning}); drop {flag} or set it "
        f"to {wanted}"
    ]


def _world_size(args: argparse.Namespace) -> Optional[int]:
    world = getattr(args, "world_size", None) or os.environ.get("WORLD_SIZE")
    return int(world) if world else None


def apply_helix_args(
    args: argparse.Namespace, world_size: Optional[int] = None
) -> Optional[HelixParallelDims]:
    """Turn the helix flags into Megatron's parallel sizes; call before ``validate_args``.

    Sets ``tensor_model_parallel_size = m * n`` (``--helix-n k`` alone splits whole heads ``k``
    ways, like Megatron's TP of ``k``); ``context_parallel_size`` and ``helix_ring_size`` to the
    ring size (``--helix-ring-size``, or Megatron's ``--context-parallel-size`` when only that
    is given, because helix attention must run the ring whenever the sequence is split); and,
    with ``--helix-layerwise``, a pipeline size of one layer per stage unless one is given.
    A Megatron size of 1 counts as not given; any other value must agree with the helix flags.

    Returns the validated sizes, or None when no helix flag is set (or the parser never added
    them), leaving ``args`` untouched. ``world_size`` defaults to ``args.world_size`` or the
    ``WORLD_SIZE`` environment variable; when none is known only the model shape is checked.

    Raises:
        HelixConfigError: listing every problem, each naming its flags.
    """
    if not hasattr(args, "helix_m"):
        return None
    layerwise = getattr(args, "helix_layerwise", False)
    budget = getattr(args, "helix_cache_budget", None)
    if not (uses_helix(args) or layerwise or budget is not None):
        return None

    m, n = args.helix_m, args.helix_n
    problems: List[str] = []
    tp = getattr(args, "tensor_model_parallel_size", 1)
    problems += _contradiction(
        "--tensor-model-parallel-size", tp, m * n, f"--helix-m {m} x --helix-n {n}",
        "the helix group is Megatron's tensor-parallel group"
        + (f"; --helix-n {tp} splits whole heads {tp} ways like TP {tp}" if m * n == 1 else ""),
    )
    cp = getattr(args, "context_parallel_size", 1)
    if args.helix_ring_size > 1:
        problems += _contradiction(
            "--context-parallel-size", cp, args.helix_ring_size,
            f"--helix-ring-size {args.helix_ring_size}",
            "the ring is Megatron's context-parallel group",
        )
        cp = args.helix_ring_size
    pp = getattr(args, "pipeline_model_parallel_size", 1)
    if layerwise:
        num_layers = getattr(args, "num_layers", None)
        if num_layers is None:
            problems.append("--helix-layerwise needs --num-layers")
        elif pp == 1:
            pp = num_layers
    if budget is not None and not layerwise:
        problems.append("--helix-cache-budget needs --helix-layerwise")
    problems += _incompatibility_errors(args)

    # An unknown world size checks only the shape: the smallest world holding the layout.
    world = world_size or _world_size(args) or m * n * cp * pp
    dims = HelixParallelDims(world_size=world, m=m, n=n, ring=cp, pp=pp)
    problems += dims.errors(**_model_shape(args))
    if problems:
        raise HelixConfigError("invalid helix arguments:\n  - " + "\n  - ".join(problems))

    args.tensor_model_parallel_size = m * n
    args.context_parallel_size = args.helix_ring_size = cp
    args.pipeline_model_parallel_size = pp
    return dims


def _model_shape(args: argparse.Namespace) -> dict:
    """The attention shape as ``HelixParallelDims.errors`` wants it, before Megatron fills
    ``kv_channels`` and ``num_query_groups`` in (it does so in ``validate_args``)."""
    heads = getattr(args, "num_attention_heads", None)
    hidden = getattr(args, "hidden_size", None)
    head_dim = getattr(args, "kv_channels", None)
    if head_dim is None and heads and hidden and hidden % heads == 0:
        head_dim = hidden // heads
    groups = heads
    if getattr(args, "group_query_attention", False) and getattr(args, "num_query_groups", None):
        groups = args.num_query_groups
    return dict(
        num_heads=heads if head_dim else None,
        num_query_groups=groups,
        head_dim=head_dim,
        rope_pairing=rope_pairing_from_args(args),
        seq_length=getattr(args, "seq_length", None),
    )


def helix_spec_from_args(args: argparse.Namespace):
    """The helix GPT layer spec (local or TE, dense or MoE) for validated Megatron args.

    Call after ``validate_args`` (it turns ``--num-experts 0`` into None). Imported lazily so
    that parsing and validating flags never imports torch or megatron-core.
    """
    from megatron_helix.specs import get_gpt_layer_helix_spec

    return get_gpt_layer_helix_spec(
        num_experts=getattr(args, "num_experts", None) or None,
        moe_grouped_gemm=getattr(args, "moe_grouped_gemm", False),
        qk_layernorm=getattr(args, "qk_layernorm", False),
        use_te=getattr(args, "transformer_impl", "local") == "transformer_engine",
        score_strategy=getattr(args, "helix_score_strategy", "auto"),
        ring=getattr(args, "context_parallel_size", 1) > 1,
        position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
        normalization=getattr(args, "normalization", None),
    )


__all__ = [
    "HelixConfigError",
    "add_helix_args",
    "apply_helix_args",
    "helix_args_provider",
    "helix_spec_from_args",
    "parse_bytes",
    "rope_pairing_from_args",
    "uses_helix",
]

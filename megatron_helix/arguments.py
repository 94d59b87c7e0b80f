"""Command-line flags for helix, ring and layer-wise parallelism, and their translation into
Megatron's own parallel sizes.

The helix group *is* Megatron's tensor-parallel group, the ring *is* its context-parallel group
and layer-wise stages *are* its pipeline stages, so the flags add no sizes next to Megatron's:
``apply_helix_args`` rewrites ``--tensor-model-parallel-size``, ``--context-parallel-size`` and
the pipeline size and layout from them *before* Megatron's ``validate_args`` derives the
data-parallel size, sequence parallelism and the expert sizes from those numbers. Every problem
is reported at once, naming the flags, the numbers and a value that works, identically on every
rank, before any process group exists.

Megatron-LM's training loop needs four hooks, in this order: ``helix_args_provider`` (its
``extra_args_provider``), ``apply_helix_args`` (before ``validate_args``),
``initialize_helix_from_args`` (after its process groups and seeds) and
``helix_spec_from_args`` (the layer spec). ``patches/`` calls them from Megatron-LM's code,
``megatron_helix.launch`` wraps an unmodified tree with them, and the plugin's own trainer calls
them from its own argparse parser. Both parsers use Megatron's flag names; attributes a parser
does not define read as Megatron's defaults (feature off).
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from typing import Callable, List, Optional, Tuple

from megatron_helix.attention.decode_mode import DECODE_MODES
from megatron_helix.attention.strategy import STRATEGIES
from megatron_helix.attention.unsupported_features import unsupported_attention_features
from megatron_helix.checkpoint_record import check_checkpoint_to_load, mark_standard_layout
from megatron_helix.layerwise import LayerwisePlanError, StagePlan, parse_budget, plan_from_args
from megatron_helix.layout import rope_pairing
from megatron_helix.parallel_dims import (
    HelixConfigError,
    HelixParallelDims,
    model_errors,
    size_errors,
)

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def _budget(text: str) -> str:
    """argparse type of ``--helix-cache-budget``: checked now, kept as written (it is logged)."""
    try:
        parse_budget(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_helix_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the helix argument group; returns the parser (Megatron's ``extra_args_provider``)."""
    group = parser.add_argument_group(
        title="helix",
        description="Helix attention (heads x head-dim partitioning on the tensor-parallel "
        "group), ring attention on the context-parallel group, layer-wise pipeline stages.",
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
        help="Ranks in the attention ring (the sequence is split R ways); becomes the "
        "context-parallel size. Runs the plugin's ring attention, no Transformer Engine needed.",
    )
    group.add_argument(
        "--helix-score-strategy", choices=STRATEGIES, default="auto",
        help="How the m dim slices of a head combine attention scores: 'allreduce' (partial "
        "scores; cheap for short queries), 'redistribute' (all-to-all to whole heads; for long "
        "prefill and training) or 'auto' (fewer bytes for the shapes at hand).",
    )
    group.add_argument(
        "--helix-decode", choices=DECODE_MODES, default="auto",
        help="How the m dim slices of a head serve a static KV cache: 'slices' (each caches "
        "its d/m dims of every token; the score all-reduce grows with the context), "
        "'kv-parallel' (each caches 1/m of the tokens at the full head dim; traffic per step "
        "independent of the context) or 'auto' (kv-parallel when m > 1 and it sends fewer "
        "bytes per decode step at the context's maximum length).",
    )
    group.add_argument(
        "--helix-layerwise", action="store_true",
        help="Layer-wise pipeline: one decoder layer per stage unless "
        "--pipeline-model-parallel-size is given; with --helix-cache-budget the planner cuts "
        "the layers so that every stage's training working set fits the budget.",
    )
    group.add_argument(
        "--helix-cache-budget", type=_budget, default=None, metavar="SIZE",
        help="Per-device budget of a layer-wise stage: 50MB (10^6 B), 40MiB (2^20 B), a byte "
        "count, or a device name such as h100-l2 or h100-hbm (needs --helix-layerwise).",
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
    return rope_pairing(kind, getattr(args, "rotary_interleaved", False))


# Megatron features that replace or bypass the attention the helix spec provides:
# (attribute, flag, why). Set means anything but Megatron's default (None / False).
_INCOMPATIBLE = (
    ("use_legacy_models", "--use-legacy-models", "helix attention is a megatron-core spec"),
    ("experimental_attention_variant", "--experimental-attention-variant",
     "it replaces the attention spec"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path",
     "it replaces the layer spec"),
    ("mtp_num_layers", "--mtp-num-layers", "multi-token-prediction layers are not helix layers"),
    ("hybrid_context_parallel", "--hybrid-context-parallel",
     "the helix ring is one flat context-parallel group"),
    ("hierarchical_context_parallel_sizes", "--hierarchical-context-parallel-sizes",
     "the helix ring is one flat context-parallel group"),
    ("sft", "--sft", "its packed sequences (THD) have no helix attention"),
)

def _attention_errors(args: argparse.Namespace) -> List[str]:
    """Flags whose model the helix layer spec cannot build."""
    problems = [
        f"{flag} cannot be combined with helix attention: {why}"
        for attr, flag, why in _INCOMPATIBLE
        if getattr(args, attr, None) not in (None, False)
    ] + [
        f"{feature} cannot be combined with helix attention"
        for feature in unsupported_attention_features(args)
    ]
    if getattr(args, "transformer_impl", "local") == "inference_optimized":
        problems.append(
            "--transformer-impl inference_optimized has no helix spec; use local or "
            "transformer_engine"
        )
    backend = getattr(args, "attention_backend", None)  # Megatron parses it to an enum
    if getattr(backend, "name", backend) == "local":
        problems.append(
            "--attention-backend local replaces the helix core attention with megatron-core's "
            "DotProductAttention (Megatron-LM core_v0.19.0's model builder); drop it (the "
            "helix spec chooses its core attention)"
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
    softmax = getattr(args, "softmax_type", "vanilla")
    if softmax not in (None, "vanilla"):
        problems.append(f"--softmax-type {softmax}: helix attention supports vanilla softmax")
    kind = getattr(args, "position_embedding_type", "learned_absolute")
    if kind in ("mrope", "relative"):
        problems.append(
            f"--position-embedding-type {kind} is not supported with helix attention; "
            f"use rope, learned_absolute or none"
        )
    if args.helix_m == 1:
        return problems
    rotary_percent = getattr(args, "rotary_percent", 1.0)
    if rope_pairing_from_args(args) != "none" and rotary_percent != 1.0:
        problems.append(
            f"--rotary-percent {rotary_percent} with --helix-m {args.helix_m}: a dim slice "
            f"must hold whole RoPE pairs of a fully rotated head; use --rotary-percent 1.0 "
            f"or --helix-m 1"
        )
    return problems


def _checkpoint_errors(args: argparse.Namespace) -> List[str]:
    """Checkpoint formats that would store a rank's helix-ordered tensors as they are.

    Only torch_dist asks the model for its ``sharded_state_dict``, where the helix attention
    describes its rows as pieces of the standard tensors; the distributed optimizer's default
    ``dp_reshardable`` format flattens those pieces per data-parallel shard, which no standard
    tensor can describe. Checked only when the run saves or loads.
    """
    if args.helix_m == 1 or not (getattr(args, "save", None) or getattr(args, "load", None)):
        return []
    problems = []
    fmt = getattr(args, "ckpt_format", "torch_dist")
    if fmt != "torch_dist":
        problems.append(
            f"--ckpt-format {fmt} with --helix-m {args.helix_m}: it would save each rank's "
            f"attention rows in helix order, which only the same layout could read; use "
            f"--ckpt-format torch_dist (Megatron's default), which stores the standard tensors"
        )
    if getattr(args, "use_distributed_optimizer", False) and not getattr(
            args, "dist_ckpt_optim_fully_reshardable", False):
        problems.append(
            f"--use-distributed-optimizer with --helix-m {args.helix_m} saves its state "
            f"flattened per data-parallel shard (dp_reshardable), which cannot hold the helix "
            f"attention's standard-layout pieces; add --dist-ckpt-optim-fully-reshardable"
        )
    return problems


def _ring_errors(args: argparse.Namespace, ring: int) -> List[str]:
    """What the ring core attention refuses at run time, said at argument time."""
    problems = []
    comm = getattr(args, "cp_comm_type", None) or ["p2p"]
    comm = [comm] if isinstance(comm, str) else comm
    if any(kind != "p2p" for kind in comm):
        problems.append(
            f"--cp-comm-type {' '.join(comm)} with --helix-ring-size {ring}: the helix ring is "
            f"the p2p ring; use --cp-comm-type p2p"
        )
    if getattr(args, "window_size", None) is not None:
        problems.append(
            f"--window-size with --helix-ring-size {ring}: the ring attention has no sliding "
            f"window; drop --window-size or the ring"
        )
    m, n = args.helix_m, args.helix_n
    heads = getattr(args, "num_attention_heads", None)
    if m > 1 and heads:
        groups = _model_shape(args)["num_query_groups"]
        if (heads // n) % m or (groups // n) % m:
            problems.append(
                f"--helix-ring-size {ring} with --helix-m {m}: the ring attends whole heads, so "
                f"each head group's {heads // n} heads and {groups // n} key/value heads "
                f"(--helix-n {n}) must divide by --helix-m {m}; use --helix-m 1 or a --helix-n "
                f"that leaves multiples of {m}"
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


_PIPELINE_CUT_FLAGS = (
    ("pipeline_model_parallel_layout", "--pipeline-model-parallel-layout"),
    ("decoder_first_pipeline_num_layers", "--decoder-first-pipeline-num-layers"),
    ("decoder_last_pipeline_num_layers", "--decoder-last-pipeline-num-layers"),
)


def _layerwise_stages(
    args: argparse.Namespace, tensor_split: int
) -> Tuple[int, Optional[StagePlan], List[str]]:
    """Pipeline stages of ``--helix-layerwise``: ``(stages, plan or None, problems)``.

    Stages: ``--pipeline-model-parallel-size`` when given, else one per decoder layer. With a
    budget the layer-wise planner cuts the layers into them so that every stage's training
    working set fits, or explains why none does.
    """
    num_layers = getattr(args, "num_layers", None)
    if num_layers is None:
        return 1, None, ["--helix-layerwise needs --num-layers"]
    stages = getattr(args, "pipeline_model_parallel_size", 1)
    stages = num_layers if stages == 1 else stages
    budget = getattr(args, "helix_cache_budget", None)
    if budget is None:
        return stages, None, []
    problems = [
        f"{flag} and --helix-cache-budget both cut the pipeline; drop {flag}"
        for attr, flag in _PIPELINE_CUT_FLAGS if getattr(args, attr, None) is not None
    ]
    shape = {name: getattr(args, name, None) for name in (
        "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length", "micro_batch_size")}
    missing = [f"--{name.replace('_', '-')}" for name, value in shape.items() if value is None]
    if missing:
        return stages, None, problems + [f"--helix-cache-budget needs {', '.join(missing)}"]
    groups = getattr(args, "num_query_groups", None)
    try:
        plan = plan_from_args(
            num_layers=num_layers, **shape, budget=budget,
            pipeline_model_parallel_size=stages, tensor_model_parallel_size=tensor_split,
            mode="training",
            num_query_groups=groups if getattr(args, "group_query_attention", False) else None,
            kv_channels=getattr(args, "kv_channels", None),
            num_experts=getattr(args, "num_experts", None) or None,
            moe_router_topk=getattr(args, "moe_router_topk", 2),
            vocab_size=getattr(args, "vocab_size", None),
            gated_linear_unit=getattr(args, "swiglu", False),
            add_bias_linear=getattr(args, "add_bias_linear", True),
            normalization=getattr(args, "normalization", "LayerNorm"),
            untie_embeddings_and_output_weights=getattr(
                args, "untie_embeddings_and_output_weights", False),
            dtype_bytes=2 if getattr(args, "fp16", False) or getattr(args, "bf16", False) else 4,
        )
    except (LayerwisePlanError, ValueError) as error:
        problems.append(f"--helix-layerwise --helix-cache-budget {budget}: {error}")
        return stages, None, problems
    return stages, plan, problems


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
    with ``--helix-layerwise``, the pipeline size (and, with a budget, the planner's
    ``pipeline_model_parallel_layout``). A Megatron size of 1 counts as not given; any other
    value must agree with the helix flags.

    Returns the validated sizes, or None when no helix flag is set (or the parser never added
    them), leaving ``args`` untouched. ``world_size`` defaults to ``args.world_size`` or the
    ``WORLD_SIZE`` environment variable; when none is known only the model shape is checked.

    Raises:
        HelixConfigError: listing every problem, each naming its flags.
    """
    if not hasattr(args, "helix_m"):
        return None
    check_checkpoint_to_load(args)
    layerwise = getattr(args, "helix_layerwise", False)
    budget = getattr(args, "helix_cache_budget", None)
    if not (uses_helix(args) or layerwise or budget is not None):
        return None

    m, n = args.helix_m, args.helix_n
    tp = getattr(args, "tensor_model_parallel_size", 1)
    problems = _contradiction(
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
    pp, plan = getattr(args, "pipeline_model_parallel_size", 1), None
    if layerwise:
        pp, plan, found = _layerwise_stages(args, m * n)
        problems += found
    elif budget is not None:
        problems.append("--helix-cache-budget needs --helix-layerwise")
    if uses_helix(args):
        problems += _attention_errors(args) + _checkpoint_errors(args)
    if cp > 1 and uses_helix(args):
        problems += _ring_errors(args, cp)

    # An unknown world size checks only the shape: the smallest world holding the layout.
    world = world_size or _world_size(args) or m * n * cp * pp
    problems += size_errors(world, m, n, cp, pp) + model_errors(m, n, cp, **_model_shape(args))
    if problems:
        raise HelixConfigError("invalid helix arguments:\n  - " + "\n  - ".join(problems))
    dims = HelixParallelDims(world_size=world, m=m, n=n, ring=cp, pp=pp)

    if uses_helix(args):
        mark_standard_layout(args)
    args.tensor_model_parallel_size = m * n
    args.context_parallel_size = args.helix_ring_size = cp
    args.pipeline_model_parallel_size = pp
    if plan is not None and plan.num_stages > 1:
        args.pipeline_model_parallel_layout = plan.pipeline_layout
    return dims


def _model_shape(args: argparse.Namespace) -> dict:
    """The attention shape as ``model_errors`` wants it, before Megatron fills
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


def initialize_helix_from_args(args: argparse.Namespace) -> None:
    """Build the helix groups and seed the slice groups' dropout; a no-op without helix.

    Call on every rank right after Megatron's ``initialize_model_parallel`` and seeding (group
    creation is collective). The seed follows Megatron's ``seed + 100 * pipeline rank`` so
    pipeline stages draw different masks while the ranks of one slice group agree.
    """
    if getattr(args, "helix_m", 1) * getattr(args, "helix_n", 1) == 1:
        return
    from megatron.core import parallel_state as mpu

    from megatron_helix.parallel_state import build_helix_groups, helix_manual_seed

    timeout = timedelta(minutes=getattr(args, "distributed_timeout_minutes", 10))
    build_helix_groups(args.helix_m, args.helix_n, timeout=timeout)
    helix_manual_seed(args.seed + 100 * mpu.get_pipeline_model_parallel_rank())


def helix_config_class(args: argparse.Namespace):
    """The ``config_class`` for Megatron-LM's ``core_transformer_config_from_args``:
    ``HelixTransformerConfig`` when the model uses helix attention, else None (Megatron's
    own choice). Imported here, not at the top, so that parsing flags never imports torch."""
    if not uses_helix(args):
        return None
    from megatron_helix.config import HelixTransformerConfig

    return HelixTransformerConfig


def helix_spec_from_args(args: argparse.Namespace):
    """The helix GPT layer spec (local or TE, dense or MoE) for validated Megatron args.

    Call after ``validate_args`` (it turns ``--num-experts 0`` into None). The specs are
    imported here, not at the top, so that parsing and validating flags never imports torch.
    """
    from megatron_helix.specs import get_gpt_layer_helix_spec

    return get_gpt_layer_helix_spec(
        num_experts=getattr(args, "num_experts", None) or None,
        moe_grouped_gemm=getattr(args, "moe_grouped_gemm", False),
        qk_layernorm=getattr(args, "qk_layernorm", False),
        use_te=getattr(args, "transformer_impl", "local") == "transformer_engine",
        score_strategy=getattr(args, "helix_score_strategy", "auto"),
        decode_mode=getattr(args, "helix_decode", "auto"),
        ring=getattr(args, "context_parallel_size", 1) > 1,
        position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
        normalization=getattr(args, "normalization", None),
    )


__all__ = [
    "HelixConfigError",
    "add_helix_args",
    "apply_helix_args",
    "helix_args_provider",
    "helix_config_class",
    "helix_spec_from_args",
    "initialize_helix_from_args",
    "rope_pairing_from_args",
    "uses_helix",
]

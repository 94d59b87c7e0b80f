"""Megatron-LM's model-shape flags, shared by the trainer, ``megatron-helix plan`` and the
layer-wise planner.

One table holds them with Megatron-LM core_v0.16.1's names, attribute names, types, choices
and defaults (``megatron/training/arguments.py`` and the ``TransformerConfig`` fields it turns
into flags), so a Megatron-LM command line means the same model to all three; each caller sets
only its own defaults and which flags it requires. ``model_shape_kwargs`` turns the parsed
flags into ``ModelShape``'s names the way Megatron-LM turns them into ``TransformerConfig``'s.
"""

from __future__ import annotations

import argparse
from typing import Dict, Iterable, Mapping, Optional, Tuple

_FLAGS: Tuple[Tuple[str, Dict[str, object]], ...] = (
    ("--num-layers", dict(type=int, default=None)),
    ("--hidden-size", dict(type=int, default=None)),
    ("--num-attention-heads", dict(type=int, default=None)),
    ("--group-query-attention", dict(action="store_true")),
    ("--num-query-groups", dict(type=int, default=1,
                                help="key/value heads with --group-query-attention (default 1; "
                                "ignored without it, as in Megatron-LM)")),
    ("--kv-channels", dict(type=int, default=None,
                           help="head dim; default hidden-size / num-attention-heads")),
    ("--ffn-hidden-size", dict(type=int, default=None, help="default 4 x hidden-size")),
    ("--seq-length", dict(type=int, default=None)),
    ("--vocab-size", dict(type=int, default=None)),
    ("--num-experts", dict(type=int, default=None)),
    ("--moe-router-topk", dict(type=int, default=2)),
    ("--disable-bias-linear", dict(dest="add_bias_linear", action="store_false",
                                   help="no biases in linear layers (the trainer needs it with "
                                   "--num-experts)")),
    # Megatron-LM also offers 'mrope' (needs --mrope-section) and 'relative' (T5 only), which
    # megatron-core's GPTModel cannot build from these flags.
    ("--position-embedding-type", dict(default="learned_absolute",
                                       choices=["learned_absolute", "rope", "none"])),
    ("--rotary-interleaved", dict(action="store_true")),
    ("--rotary-base", dict(type=int, default=10000)),
    ("--swiglu", dict(action="store_true", help="SwiGLU MLP (gated, SiLU)")),
    ("--normalization", dict(default="LayerNorm", choices=["LayerNorm", "RMSNorm"])),
    ("--qk-layernorm", dict(action="store_true",
                            help="per-head query/key norm (of --normalization's kind)")),
    ("--untie-embeddings-and-output-weights", dict(action="store_true")),
    ("--attention-dropout", dict(type=float, default=0.1)),
    ("--hidden-dropout", dict(type=float, default=0.1)),
    ("--recompute-granularity", dict(choices=["full", "selective"], default=None,
                                     help="activation recomputation: 'full' recomputes every "
                                     "layer (Megatron's uniform method, one layer per chunk), "
                                     "'selective' the core attention")),
)


def add_model_shape_args(
    parser: argparse.ArgumentParser,
    title: str = "model",
    defaults: Optional[Mapping[str, object]] = None,
    required: Iterable[str] = (),
) -> argparse._ArgumentGroup:
    """Add the model-shape flags as a group titled ``title``; returns it for the caller's own
    flags.

    ``defaults`` replaces Megatron-LM's defaults and ``required`` names flags that must be
    given, both by attribute name (``{"num_layers": 2}``, ``("hidden_size",)``): the names,
    types and meanings stay Megatron-LM's whoever parses them.
    """
    group = parser.add_argument_group(title)
    actions = {action.dest: action for action in (
        group.add_argument(flag, **options) for flag, options in _FLAGS)}
    defaults = dict(defaults or {})
    required = set(required)
    unknown = sorted((set(defaults) | required) - set(actions))
    if unknown:
        raise ValueError(f"not model-shape flags: {', '.join(unknown)}")
    for dest, value in defaults.items():
        actions[dest].default = value
    for dest in required:
        actions[dest].required = True
    return group


def model_shape_kwargs(args: argparse.Namespace) -> Dict[str, object]:
    """``ModelShape``'s keyword arguments from the parsed flags.

    As Megatron-LM builds ``TransformerConfig``: ``--swiglu`` is a gated linear unit and
    ``--num-query-groups`` counts only with ``--group-query-attention``. Values that are None
    are left out, so ``ModelShape``'s defaults (or a preset's values) stand.
    """
    values = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, num_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk, vocab_size=args.vocab_size,
        gated_linear_unit=args.swiglu, add_bias_linear=args.add_bias_linear,
        normalization=args.normalization,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
    )
    return {name: value for name, value in values.items() if value is not None}

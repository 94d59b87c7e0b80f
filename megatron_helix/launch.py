"""Run an unmodified Megatron-LM training script with the helix flags.

    torchrun --nproc-per-node 8 ... -m megatron_helix.launch $MEGATRON_LM_DIR/pretrain_gpt.py \\
        --helix-m 4 --helix-n 4 ...

The script runs as ``__main__`` exactly as ``python pretrain_gpt.py`` would (its directory first
on ``sys.path``, so its own ``megatron`` package is imported), after ``install_hooks()`` has
wrapped the points of Megatron-LM core_v0.16.1 that ``patches/`` edits:

- ``megatron.training.initialize.parse_args`` (and ``megatron.training.arguments.parse_args``,
  which the early fault-tolerance and in-process-restart parses call, so ``--help`` lists the
  helix flags) gets ``helix_args_provider`` chained after the script's own provider;
- ``initialize.validate_args`` runs ``apply_helix_args`` first, then points ``args.spec`` at
  the helix layer spec, which Megatron's ``--spec`` lookup (``vars(module)[name]`` on
  ``launched_layer_spec`` below) hands to ``gpt_builders`` unchanged;
- ``initialize._set_random_seed`` is followed by ``initialize_helix_from_args``;
- ``megatron.training.arguments.core_transformer_config_from_args`` builds the config with
  ``helix_config_class`` (before the script's ``from ... import`` binds the name).

``initialize_megatron`` looks these names up in its module at call time, which is what makes
this work without editing files; it is also why the launcher is tied to one release.

``--cpu`` (first argument) adds ``megatron_helix.megatron_lm_cpu``, the CPU execution mode for
tests and demos; it is the only thing the launcher adds to a tree that carries the patch.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import List, Optional

from megatron_helix.arguments import (
    apply_helix_args,
    helix_args_provider,
    helix_config_class,
    helix_spec_from_args,
    initialize_helix_from_args,
    uses_helix,
)

USAGE = "usage: python -m megatron_helix.launch [--cpu] SCRIPT.py [script arguments...]"

#: The layer spec computed for this run; ``args.spec`` names it (Megatron imports it by name).
launched_layer_spec = None
LAUNCHED_SPEC = ["megatron_helix.launch", "launched_layer_spec"]

_HOOKED = ("parse_args", "validate_args", "_set_random_seed")


def _route_spec_through_megatron(args: argparse.Namespace) -> None:
    """Point ``args.spec`` at the helix spec so an unmodified ``gpt_builders`` builds it."""
    global launched_layer_spec
    if not uses_helix(args) or args.spec not in (None, LAUNCHED_SPEC):
        return
    launched_layer_spec = helix_spec_from_args(args)
    args.spec = list(LAUNCHED_SPEC)


def is_patched() -> bool:
    """Whether the imported Megatron-LM tree carries ``patches/`` (its hooks are in place)."""
    from megatron.training import initialize

    return hasattr(initialize, "helix_hooks")


def install_hooks() -> None:
    """Wrap Megatron-LM's parse, validate and seed steps with the helix hooks.

    Raises:
        RuntimeError: the tree already carries the patch (the flags would be added twice), or
            lacks a hooked name (another release: use or port ``patches/``).
    """
    from megatron.training import arguments, initialize

    if is_patched():
        raise RuntimeError(
            "this Megatron-LM tree already carries the megatron_helix patch: run the script "
            "directly instead of through megatron_helix.launch"
        )
    missing = [name for name in _HOOKED if not hasattr(initialize, name)]
    if missing:
        raise RuntimeError(
            f"megatron.training.initialize has no {', '.join(missing)}: megatron_helix.launch "
            f"hooks Megatron-LM core_v0.16.1; for another release port patches/ "
            f"(see patches/README.md)"
        )
    parse, validate, seed = (getattr(initialize, name) for name in _HOOKED)

    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return parse(helix_args_provider(extra_args_provider), ignore_unknown_args)

    def validate_args(args, *rest, **kwargs):
        apply_helix_args(args)
        result = validate(args, *rest, **kwargs)
        _route_spec_through_megatron(args)
        return result

    def set_random_seed(*seed_args, **seed_kwargs):
        seed(*seed_args, **seed_kwargs)
        from megatron.training.global_vars import get_args

        initialize_helix_from_args(get_args())

    build_config = arguments.core_transformer_config_from_args

    def core_transformer_config_from_args(args, config_class=None):
        return build_config(args, config_class or helix_config_class(args))

    arguments.parse_args = initialize.parse_args = parse_args
    arguments.core_transformer_config_from_args = core_transformer_config_from_args
    initialize.validate_args = validate_args
    initialize._set_random_seed = set_random_seed


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m megatron_helix.launch [--cpu] SCRIPT.py ARGS...``: hooks, then the script.

    ``--cpu`` runs the script on CPU gloo ranks (``megatron_helix.megatron_lm_cpu``, for tests
    and demos). On a tree that carries the patch only ``--cpu`` makes sense: the patch already
    calls the helix hooks.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu = bool(argv) and argv[0] == "--cpu"
    argv = argv[1:] if cpu else argv
    if not argv or not argv[0].endswith(".py") or not os.path.isfile(argv[0]):
        raise SystemExit(
            f"{USAGE}\n(got {argv[0] if argv else 'nothing'}: the first argument must be a "
            f"Megatron-LM training script such as $MEGATRON_LM_DIR/pretrain_gpt.py)"
        )
    script = os.path.abspath(argv[0])
    # Before any megatron import: the script's tree provides megatron.training.
    sys.path.insert(0, os.path.dirname(script))
    sys.argv = [script, *argv[1:]]
    if not (cpu and is_patched()):
        install_hooks()
    if cpu:
        from megatron_helix.megatron_lm_cpu import enable_megatron_lm_cpu_execution

        enable_megatron_lm_cpu_execution()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: the spec that args.spec names
    # must live in the module Megatron imports as "megatron_helix.launch".
    from megatron_helix.launch import main as _main

    _main()

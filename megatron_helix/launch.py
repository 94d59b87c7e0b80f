"""Run an unmodified Megatron-LM training script with the helix flags.

    torchrun --nproc-per-node 8 ... -m megatron_helix.launch $MEGATRON_LM_DIR/pretrain_gpt.py \\
        --helix-m 4 --helix-n 4 ...

The script runs as ``__main__`` exactly as ``python pretrain_gpt.py`` would (its directory first
on ``sys.path``, so its own ``megatron`` package is imported), after ``install_hooks()`` has
wrapped the points of Megatron-LM (core_v0.16.1 or core_v0.19.0) that ``patches/`` edits:

- ``parse_args`` (in ``megatron.training.arguments``, which the early fault-tolerance and
  in-process-restart parses call, so ``--help`` lists the helix flags, and on core_v0.16.1
  also ``initialize``'s copy) gets ``helix_args_provider`` chained after the script's own;
- ``validate_args`` (``initialize``'s on core_v0.16.1, ``arguments``' on core_v0.19.0, where
  ``parse_and_validate_args`` calls it) runs ``apply_helix_args`` first, then points
  ``args.spec`` at the helix layer spec, which Megatron's ``--spec`` lookup
  (``vars(module)[name]`` on ``launched_layer_spec`` below) hands to the model builder
  (``gpt_builders``, or ``argument_utils.gpt_config_from_args`` on core_v0.19.0) unchanged;
- ``initialize._set_random_seed`` is followed by ``initialize_helix_from_args``;
- ``core_transformer_config_from_args`` (where it is defined, and ``arguments``' name for it)
  builds the config with ``helix_config_class`` (before the script's ``from ... import`` binds
  the name).

Megatron-LM looks these names up in their modules at call time, which is what makes this work
without editing files; which modules hold them differs by release
(``megatron_helix.compat.megatron_lm_argument_modules`` / ``megatron_lm_config_modules``), and
a tree that has none of them is refused, naming what is missing.

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
    from megatron.training import initialize

    from megatron_helix import compat  # imports megatron.core: the tree's, once on sys.path

    if is_patched():
        raise RuntimeError(
            "this Megatron-LM tree already carries the megatron_helix patch: run the script "
            "directly instead of through megatron_helix.launch"
        )
    parsing, validating = compat.megatron_lm_argument_modules()
    configs = compat.megatron_lm_config_modules()
    wanted = [(module, "parse_args") for module in parsing]
    wanted += [(validating, "validate_args"), (initialize, "_set_random_seed")]
    wanted += [(module, "core_transformer_config_from_args") for module in configs]
    missing = [f"{module.__name__}.{name}" for module, name in wanted
               if not hasattr(module, name)]
    if missing:
        raise RuntimeError(
            f"this Megatron-LM tree has no {', '.join(missing)}: megatron_helix.launch hooks "
            f"Megatron-LM {' and '.join(compat.MEGATRON_LM_TAGS.values())}; for another "
            f"release port patches/ (see patches/README.md)"
        )
    parse = parsing[0].parse_args
    validate, seed = validating.validate_args, initialize._set_random_seed
    build_config = configs[0].core_transformer_config_from_args

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

    def core_transformer_config_from_args(args, config_class=None):
        return build_config(args, config_class or helix_config_class(args))

    for module in parsing:
        module.parse_args = parse_args
    for module in configs:
        module.core_transformer_config_from_args = core_transformer_config_from_args
    validating.validate_args = validate_args
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

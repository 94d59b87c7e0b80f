"""What differs between the megatron-core releases the plugin supports, in one place.

The plugin runs on megatron-core 0.16.1 through 0.19.x (CI: 0.16.1 on Python 3.11, 0.19.2 on
Python 3.12). Between them, three internals it calls changed shape:

- ``SelfAttention.__init__`` gained ``pp_layer_offset`` and ``name`` (0.19), which
  ``TransformerLayer`` now always passes; a subclass must take them and pass on only what the
  installed constructor accepts.
- ``megatron.core.utils.get_batch_on_this_cp_rank`` gained a required ``is_hybrid_cp`` (0.19),
  and there ``cp_group=None`` splits the batch over the whole world instead of the
  context-parallel group. ``get_batch_on_this_cp_rank`` below always names the group.
- The gradient buffer asks ``torch.cuda.current_stream()`` on every gradient sync (0.19), one
  more CUDA touch point for the CPU mode (``megatron_helix.cpu`` redirects it on every release).

Each difference is decided once, by probing the installed function, not by comparing version
numbers, so a patch release that backports a change is handled as well.

The second section, at the end, does the same for Megatron-LM's training package (the
``megatron/training`` of a Megatron-LM tree: tags core_v0.16.1 and core_v0.19.0), whose entry
points ``megatron_helix.launch`` and ``megatron_helix.megatron_lm_cpu`` wrap.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Dict, Tuple

from megatron.core import package_info

#: The supported megatron-core releases: ``MIN <= version < END``.
SUPPORTED_MIN: Tuple[int, int, int] = (0, 16, 1)
SUPPORTED_END: Tuple[int, int, int] = (0, 20, 0)


def _parse(version: str) -> Tuple[int, int, int]:
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if found is None:
        raise RuntimeError(f"cannot read megatron-core's version {version!r}")
    return tuple(int(part) for part in found.groups())


MCORE_VERSION: Tuple[int, int, int] = _parse(package_info.__version__)


def check_supported(version: Tuple[int, int, int] = MCORE_VERSION) -> None:
    """Raise, naming the installed and the supported releases, outside the tested range."""
    if not SUPPORTED_MIN <= version < SUPPORTED_END:
        low = ".".join(map(str, SUPPORTED_MIN))
        high = ".".join(map(str, SUPPORTED_END[:2]))
        raise RuntimeError(
            f"megatron_helix supports megatron-core >= {low}, < {high}; this environment has "
            f"{'.'.join(map(str, version))} (pip install 'megatron-core>={low},<{high}')"
        )


check_supported()


@functools.lru_cache(maxsize=None)
def _parameters(function) -> frozenset:
    return frozenset(inspect.signature(function).parameters)


def self_attention_kwargs(**optional) -> Dict[str, object]:
    """The keyword arguments of ``optional`` the installed ``SelfAttention.__init__`` takes.

    ``pp_layer_offset`` and ``name`` (0.19) are dropped on 0.16, where they are always
    ``None``; anything else given must be accepted.
    """
    from megatron.core.transformer.attention import SelfAttention

    accepted = _parameters(SelfAttention.__init__)
    dropped = {key: value for key, value in optional.items() if key not in accepted}
    if any(value is not None for value in dropped.values()):
        raise TypeError(
            f"megatron-core {package_info.__version__}'s SelfAttention takes no "
            f"{', '.join(sorted(dropped))}"
        )
    return {key: value for key, value in optional.items() if key in accepted}


def get_batch_on_this_cp_rank(batch: Dict[str, object]) -> Dict[str, object]:
    """Megatron's zigzag split of ``batch`` (``[b, s, ...]`` tensors) over the
    context-parallel group of ``megatron.core.parallel_state``.

    The group is always passed: on 0.19 ``cp_group=None`` means the whole world.
    """
    from megatron.core import parallel_state, utils

    split = utils.get_batch_on_this_cp_rank
    group = parallel_state.get_context_parallel_group()
    if "is_hybrid_cp" in _parameters(split):
        return split(batch, False, cp_group=group)
    return split(batch, cp_group=group)


# ---------------------------------------------------------------------------------------------
# Megatron-LM (the training package beside megatron-core: megatron/training/, pretrain_gpt.py)
#
# patches/ supports two Megatron-LM tags, one per megatron-core release line. Between them the
# training entry points moved; ``megatron_helix.launch`` (in-memory hooks on an unpatched tree)
# and ``megatron_helix.megatron_lm_cpu`` (the CPU mode) wrap names in the modules below:
#
# - core_v0.16.1: ``initialize.initialize_megatron`` parses and validates the arguments with
#   ``parse_args`` / ``validate_args`` it imported from ``arguments``; the config builder
#   ``core_transformer_config_from_args`` lives in ``arguments``.
# - core_v0.19.0: ``pretrain_gpt.py`` calls ``arguments.parse_and_validate_args``, which calls
#   ``arguments``' own ``parse_args`` / ``validate_args``; ``initialize_megatron`` no longer
#   parses. ``core_transformer_config_from_args`` moved to ``argument_utils`` (``arguments``
#   re-exports it) and ``gpt_config_from_args`` there builds the model config.
#   ``training.set_jit_fusion_options`` takes ``tp_size``.
#
# The modules are found by probing the imported tree, so a tree is handled by its layout, not
# its version string. Import megatron.training only inside the functions: the tree's directory
# must be on sys.path first.

#: The vendored Megatron-LM tag tested with each megatron-core release line (major, minor).
MEGATRON_LM_TAGS: Dict[Tuple[int, int], str] = {
    (0, 16): "core_v0.16.1",
    (0, 19): "core_v0.19.0",
}


def megatron_lm_tag(version: Tuple[int, int, int] = MCORE_VERSION) -> str:
    """The Megatron-LM tag whose ``megatron/training`` matches megatron-core ``version``."""
    try:
        return MEGATRON_LM_TAGS[version[:2]]
    except KeyError:
        known = ", ".join(f"{major}.{minor}.x -> {tag}"
                          for (major, minor), tag in MEGATRON_LM_TAGS.items())
        raise RuntimeError(
            f"no Megatron-LM tag is supported for megatron-core "
            f"{'.'.join(map(str, version))}: {known}"
        ) from None


def megatron_lm_argument_modules():
    """The modules whose global ``parse_args`` / ``validate_args`` the training entry calls.

    core_v0.16.1: ``initialize`` (its own imports of both). core_v0.19.0: ``arguments`` (its
    ``parse_and_validate_args`` calls them); ``inprocess_restart`` and ``ft_integration`` call
    ``arguments.parse_args`` on both, so ``arguments`` is the parse site everywhere.

    Returns ``(parse_sites, validate_site)``.
    """
    from megatron.training import arguments, initialize

    if hasattr(initialize, "validate_args"):  # core_v0.16.1
        return (arguments, initialize), initialize
    return (arguments,), arguments


def megatron_lm_config_modules():
    """The modules whose ``core_transformer_config_from_args`` builds GPT configs: where it is
    defined (``gpt_config_from_args`` calls it there on core_v0.19.0) and ``arguments``, which
    scripts import it from."""
    import sys

    from megatron.training import arguments

    name = "core_transformer_config_from_args"
    function = getattr(arguments, name, None)
    home = sys.modules.get(getattr(function, "__module__", None))
    if home is None or getattr(home, name, None) is not function:
        return (arguments,)  # defined here, or absent (the launcher names what is missing)
    return (home,) if home is arguments else (home, arguments)


#: Megatron-LM modules that make CUDA bookkeeping tensors, streams or device calls in the
#: training loop, for the CPU mode. core_v0.19.0 split ``training/utils.py`` into a package
#: (the functions live in ``utils.common_utils``) and moved the DDP wrapping, with its side
#: stream and ``module.cuda(...)``, to ``training/models/dist_utils.py``.
_MEGATRON_LM_CUDA_MODULES = (
    "megatron.training.initialize",
    "megatron.training.training",
    "megatron.training.checkpointing",
    "megatron.training.utils",
    "megatron.training.utils.common_utils",  # core_v0.19.0
    "megatron.training.models.dist_utils",  # core_v0.19.0
    "megatron.core.rerun_state_machine",
)


def megatron_lm_cuda_modules():
    """Those of ``_MEGATRON_LM_CUDA_MODULES`` the imported tree has, imported."""
    import importlib
    import importlib.util

    found = []
    for name in _MEGATRON_LM_CUDA_MODULES:
        try:
            present = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent is a module, not a package (core_v0.16.1 utils)
            present = False
        if present:
            found.append(importlib.import_module(name))
    return tuple(found)

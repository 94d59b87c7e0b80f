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

"""Per-device budgets: named H100 / H200 caches and memories, and sizes with units.

The named figures are datasheet figures, others' recorded readings or projections, each with
its source beside it; no GPU has run this code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Union

from megatron_helix.perf.calibration import GPU_SPECS

BUDGET_KINDS = ("cache", "memory")


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


# No GPU has run this code: every device figure below is a datasheet figure or someone else's
# recorded reading, with its source, or a projection from those; none was read here.
_H100_L2 = 52_428_800  # datasheet: NVIDIA's H100 SXM L2, "50 MB", taken as 50 MiB
# persistingL2CacheMaxSize in a cudaGetDeviceProperties dump of an H100 80GB HBM3 that others
# published; l2_residency reads the device's own limit at run time.
_H100_L2_PERSISTING = 39_321_600  # 37.5 MiB
# A recorded PyTorch reading of an H200: L2_cache_size=60MB, which torch prints as
# l2CacheSize // 2**20, so at least 60 MiB (NVIDIA gives the full GH100 chip 60 MB of L2).
_H200_L2 = 62_914_560
_SMS = 132  # datasheet: H100 SXM5's 132 SMs (NVIDIA H100 Tensor Core GPU Architecture)
_SMEM_PER_SM = 233_472  # datasheet: 228 KiB shared memory per SM (NVIDIA Hopper Tuning Guide)

NAMED_BUDGETS: Dict[str, Budget] = {
    budget.name: budget
    for budget in (
        Budget("h100", _H100_L2, "cache"),
        Budget("h100-l2", _H100_L2, "cache"),
        Budget("h100-l2-persisting", _H100_L2_PERSISTING, "cache"),
        Budget("h100-smem", _SMS * _SMEM_PER_SM, "cache"),
        Budget("h100-hbm", GPU_SPECS["h100"]["memory_bytes"], "memory"),  # datasheet: 80 GB
        Budget("h200", _H200_L2, "cache"),
        Budget("h200-l2", _H200_L2, "cache"),
        # Projection: the H100 SXM's SMs and shared memory (the H200 is the same GH100 chip).
        Budget("h200-smem", _SMS * _SMEM_PER_SM, "cache"),
        Budget("h200-hbm", GPU_SPECS["h200"]["memory_bytes"], "memory"),  # datasheet: 141 GB
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

    ``"h100"`` / ``"h200"`` are the L2 (50 MiB and 60 MiB); also ``-l2``, ``-smem``, ``-hbm`` and
    ``h100-l2-persisting`` (``NAMED_BUDGETS`` gives each figure's source). Sizes: ``"50MB"`` =
    50 * 10^6, ``"50MiB"`` = 50 * 2^20, ``"80GB"``, ``"1.5GiB"``, ``"52428800"``. ``kind``
    applies to sizes; named budgets know their kind.
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

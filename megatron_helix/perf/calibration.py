"""Achieved rates of the machine at hand, measured, and of GPUs, assumed for projections.

A ``Calibration`` is what the cost model needs to turn work into time:

- ``gemm``: achieved FLOP/s by GEMM shape ``(m, n, k)`` (a table; a query takes the nearest
  measured shape in log space) — on a GPU instead a roofline of peak FLOP/s and HBM bandwidth,
  each with an achieved fraction;
- ``attention``: achieved FLOP/s of each attention kernel the plugin runs
  (``ATTENTION_KERNELS``), forward and backward, by shape;
- ``elementwise``: bytes/s of memory-bound element-wise kernels (norms, activations, softmax);
- ``links``: an alpha-beta model per link class and collective: ``alpha`` seconds per
  algorithm step, ``beta`` bytes/s of what a rank *sends* (``comm_formulas``' definitions, so
  ``beta`` is NCCL's "bus bandwidth");
- ``layer_overhead_s``: fixed seconds per layer pass (forward or backward: framework
  dispatch, kernel launches);
- ``parallel_capacity``: on a CPU, how many ranks' worth of compute the shared cores deliver.

CPU entries are measured (``cpu_calibration``: kernels on one thread, as the trainer's ranks
run; ``collective_bench``: collectives on real gloo ranks). GPU entries (``gpu_calibration``)
are NOT measurements: datasheet peaks times achieved fractions and link rates this project
assumes, stated below, for projections until a GPU run replaces them. ``device_calibration``
measures one GPU's compute into tables; its links stay assumed (one GPU cannot measure them).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Sequence, Tuple

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
# flash: torch's flash kernel (ring blocks); unfused: Megatron's DotProductAttention;
# score_allreduce / redistribute: the helix strategies' local compute on one rank.
ATTENTION_KERNELS = ("flash", "unfused", "score_allreduce", "redistribute")


def flash_attention_flops(batch_heads: int, seq_q: int, seq_kv: int, head_dim: int,
                          causal: bool, backward: bool) -> float:
    """FLOPs of flash attention as computed: ``4 sq sk d`` per head forward (QK^T and PV),
    half of it under a causal mask; backward 2.5x forward (recomputed scores, dP, and the
    dq, dk, dv products)."""
    forward = 4.0 * batch_heads * seq_q * seq_kv * head_dim * (0.5 if causal else 1.0)
    return forward * (2.5 if backward else 1.0)


@dataclass(frozen=True)
class Link:
    """Alpha-beta cost of one collective on one link class: ``steps * alpha + sent / beta``
    seconds per call, plus, where ranks share cores (a CPU), the wait for peers that fell out
    of step while computing: ``sync`` points ``(compute seconds between calls, extra seconds
    per call)``, interpolated in the compute (empty: none, as on GPUs)."""

    alpha: float
    beta: float
    sync: Tuple[Tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta <= 0 or any(x < 0 or y < 0 for x, y in self.sync):
            raise ValueError(f"link needs alpha, sync >= 0 and beta > 0: {self}")
        object.__setattr__(self, "sync", tuple(sorted(tuple(p) for p in self.sync)))

    def sync_seconds(self, compute_between_calls: float) -> float:
        """Piecewise-linear in the compute between calls, flat beyond the measured ends."""
        points = self.sync
        if not points:
            return 0.0
        if compute_between_calls <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if compute_between_calls <= x1:
                return y0 + (y1 - y0) * (compute_between_calls - x0) / (x1 - x0)
        return points[-1][1]

    def seconds(self, sent_bytes: float, steps: int, calls: int = 1,
                compute_between_calls: float = 0.0) -> float:
        return (calls * (steps * self.alpha + self.sync_seconds(compute_between_calls))
                + sent_bytes / self.beta)


@dataclass(frozen=True)
class Roofline:
    """A GPU kernel class: ``max(flops / (peak * efficiency), bytes / (bandwidth * bw_eff))``."""

    peak_flops: float
    efficiency: float
    bandwidth: float
    bandwidth_efficiency: float

    def seconds(self, flops: float, moved_bytes: float) -> float:
        return max(flops / (self.peak_flops * self.efficiency),
                   moved_bytes / (self.bandwidth * self.bandwidth_efficiency))


@dataclass(frozen=True)
class ShapeRate:
    """A measured GEMM rate: ``shape`` ``(m, n, k)``, FLOP/s."""

    shape: Tuple[int, ...]
    flops_per_s: float


@dataclass(frozen=True)
class AttentionRate:
    """A measured attention kernel at ``shape`` ``(batch x heads, seq, head_dim)``: FLOP/s
    forward and backward, FLOPs counted as causal flash attention would compute them
    (``flash_attention_flops``) whatever the kernel does, so kernels compare directly."""

    shape: Tuple[int, ...]
    forward: float
    backward: float


def _nearest(table: Sequence, shape: Tuple[int, ...]):
    """The entry whose shape is nearest ``shape`` in log space."""
    def distance(entry) -> float:
        return sum((math.log(max(a, 1)) - math.log(max(b, 1))) ** 2
                   for a, b in zip(entry.shape, shape))
    return min(table, key=distance)


@dataclass(frozen=True)
class Calibration:
    """Rates of one device kind; see the module docstring. ``source`` says measured or assumed.

    ``parallel_capacity``: how many ranks' worth of compute one machine runs at once when its
    cores are shared by all ranks (a CPU; measured), 0 for one device per rank (a GPU).
    ``overlap``: whether communication posted asynchronously proceeds while the device
    computes (GPUs: copy engines / NCCL kernels; CPU gloo: the same cores do both, so no).
    """

    name: str
    source: str
    dtype: str
    gemm_table: Tuple[ShapeRate, ...] = ()
    attention_tables: Dict[str, Tuple[AttentionRate, ...]] = field(default_factory=dict)
    gemm_roofline: Optional[Roofline] = None
    attention_rooflines: Dict[str, Roofline] = field(default_factory=dict)
    elementwise_bytes_per_s: float = 1e12
    links: Dict[str, Dict[str, Link]] = field(default_factory=dict)
    layer_overhead_s: float = 0.0
    parallel_capacity: float = 0.0
    overlap: bool = True
    memory_bytes: int = 0
    notes: str = ""

    def gemm_seconds(self, m: int, n: int, k: int, element_bytes: int) -> float:
        flops = 2.0 * m * n * k
        if self.gemm_roofline is not None:
            return self.gemm_roofline.seconds(flops, (m * k + k * n + m * n) * element_bytes)
        return flops / _nearest(self.gemm_table, (m, n, k)).flops_per_s

    def attention_seconds(self, kernel: str, flops: float, shape: Tuple[int, int, int],
                          moved_bytes: float, backward: bool) -> float:
        """Time of attention ``kernel`` (``ATTENTION_KERNELS``) doing ``flops`` (causal-flash
        convention) at ``shape`` ``(batch x heads, seq, head_dim)``."""
        if kernel in self.attention_rooflines:
            return self.attention_rooflines[kernel].seconds(flops, moved_bytes)
        if kernel not in self.attention_tables:
            raise KeyError(f"calibration {self.name!r} has no attention kernel {kernel!r}")
        rate = _nearest(self.attention_tables[kernel], shape)
        return flops / (rate.backward if backward else rate.forward)

    def elementwise_seconds(self, moved_bytes: float) -> float:
        return moved_bytes / self.elementwise_bytes_per_s

    def link(self, collective: str, group_size: int, spans_nodes: bool) -> Link:
        """The link a ``group_size`` group uses: GPUs by link class (NVLink inside a node,
        InfiniBand across), gloo by the measured group size nearest ``group_size``."""
        if "nvlink" in self.links:
            link_class = "infiniband" if spans_nodes else "nvlink"
        else:
            sizes = {int(name[len("gloo"):]): name for name in self.links}
            if not sizes:
                raise KeyError(f"calibration {self.name!r} has no links")
            link_class = sizes[min(sizes, key=lambda size: abs(size - group_size))]
        return self.links[link_class][collective]

    # ---------------------------------------------------------------- (de)serialization

    def to_json(self) -> dict:
        data = asdict(self)
        data["links"] = {link_class: {op: asdict(link) for op, link in ops.items()}
                         for link_class, ops in self.links.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        data = dict(data)
        data["gemm_table"] = tuple(ShapeRate(tuple(e["shape"]), e["flops_per_s"])
                                   for e in data.get("gemm_table", ()))
        data["attention_tables"] = {
            kernel: tuple(AttentionRate(tuple(e["shape"]), e["forward"], e["backward"])
                          for e in entries)
            for kernel, entries in data.get("attention_tables", {}).items()}
        if data.get("gemm_roofline"):
            data["gemm_roofline"] = Roofline(**data["gemm_roofline"])
        data["attention_rooflines"] = {kernel: Roofline(**r) for kernel, r in
                                       data.get("attention_rooflines", {}).items()}
        data["links"] = {c: {op: Link(**l) for op, l in ops.items()}
                         for c, ops in data.get("links", {}).items()}
        return cls(**data)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Calibration":
        """A calibration JSON, bare or as ``megatron-helix bench --json`` writes it (under
        ``"calibration"``, beside the validation)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls.from_json(data.get("calibration", data))


# ------------------------------------------------------------------------ GPU assumptions

# Datasheet figures of the SXM parts (NVIDIA's H100 and H200 Tensor Core GPU datasheets): dense
# peak FLOP/s (without sparsity), HBM bytes/s and bytes.
GPU_SPECS = {
    "h100": dict(peak_flops={"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "fp32": 67e12},
                 hbm_bytes_per_s=3.35e12, memory_bytes=80 * 10**9),
    "h200": dict(peak_flops={"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "fp32": 67e12},
                 hbm_bytes_per_s=4.8e12, memory_bytes=141 * 10**9),
}
# From here on ASSUMPTIONS of this project, neither measured nor taken from a datasheet; a
# measured calibration (``megatron-helix plan --calibration FILE``) replaces them.
GEMM_EFFICIENCY = 0.70  # achieved fraction of the dense peak, large GEMMs
ATTENTION_EFFICIENCY = 0.45  # achieved fraction of the dense peak, fused attention fwd + bwd
FP32_GEMM_EFFICIENCY = 0.70  # of the fp32 (non-tensor-core) peak: torch keeps TF32 off
BANDWIDTH_EFFICIENCY = 0.80  # memory-bound kernels against the HBM peak
# Links: bytes/s a rank sends (NCCL's "bus bandwidth"). The datasheets give NVLink 900 GB/s
# per GPU both directions together (450 GB/s each way) and NDR InfiniBand 400 Gb/s (50 GB/s);
# the achieved shares below are assumed.
NVLINK = Link(alpha=5e-6, beta=370e9)  # ring collectives inside a node: 82% of 450 GB/s
NVLINK_NVLS = Link(alpha=5e-6, beta=480e9)  # all-reduce reduced in the NVLink switch (SHARP)
INFINIBAND = Link(alpha=10e-6, beta=45e9)  # per GPU across nodes: 90% of 50 GB/s
GPU_LAYER_OVERHEAD_S = 50e-6  # launches per layer pass left exposed (no CUDA graphs)


def gpu_calibration(gpu: str, dtype: str = "bf16") -> Calibration:
    """Rates for one GPU kind: datasheet peaks times assumed fractions, NOT measurements.

    The score all-reduce computes its partial scores in fp32 (exactness across slices), so its
    GEMMs run at the fp32 peak; the other kernels at the ``dtype`` peak.
    """
    if gpu not in GPU_SPECS:
        raise ValueError(f"gpu {gpu!r} not in {tuple(GPU_SPECS)}")
    spec = GPU_SPECS[gpu]
    if dtype not in spec["peak_flops"]:
        raise ValueError(f"dtype {dtype!r} not in {tuple(spec['peak_flops'])}")
    peak, hbm = spec["peak_flops"][dtype], spec["hbm_bytes_per_s"]
    attention = Roofline(peak, ATTENTION_EFFICIENCY, hbm, BANDWIDTH_EFFICIENCY)
    nvlink = {op: NVLINK for op in COLLECTIVES}
    nvlink["all_reduce"] = NVLINK_NVLS
    return Calibration(
        name=gpu, source="assumed (datasheet peaks x assumed achieved fractions)", dtype=dtype,
        gemm_roofline=Roofline(peak, GEMM_EFFICIENCY, hbm, BANDWIDTH_EFFICIENCY),
        attention_rooflines={
            "flash": attention, "redistribute": attention,
            "unfused": Roofline(peak, GEMM_EFFICIENCY, hbm, BANDWIDTH_EFFICIENCY),
            "score_allreduce": Roofline(spec["peak_flops"]["fp32"], FP32_GEMM_EFFICIENCY, hbm,
                                        BANDWIDTH_EFFICIENCY),
        },
        elementwise_bytes_per_s=hbm * BANDWIDTH_EFFICIENCY,
        links={"nvlink": nvlink, "infiniband": {op: INFINIBAND for op in COLLECTIVES}},
        layer_overhead_s=GPU_LAYER_OVERHEAD_S, parallel_capacity=0.0, overlap=True,
        memory_bytes=spec["memory_bytes"],
        notes=f"{gpu.upper()} {dtype}: dense peak {peak / 1e12:.0f} TFLOP/s, HBM "
              f"{hbm / 1e12:.2f} TB/s; GEMM {GEMM_EFFICIENCY:.0%}, attention "
              f"{ATTENTION_EFFICIENCY:.0%} of peak; NVLink {NVLINK.beta / 1e9:.0f} GB/s ring "
              f"({NVLINK_NVLS.beta / 1e9:.0f} NVLS all-reduce), InfiniBand "
              f"{INFINIBAND.beta / 1e9:.0f} GB/s per GPU",
    )

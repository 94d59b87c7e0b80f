"""Measure one device's compute rates for the cost model: ``megatron-helix bench --device``.

On CUDA (``measure_device("cuda")``) the kernels of ``cpu_calibration`` run in bf16 on one GPU,
timed with CUDA events, over the shapes the cost model queries for the seed workloads
(``GPU_SIZES``); the result replaces the datasheet rooflines of ``gpu_calibration`` with
measured tables. One GPU cannot measure NVLink or InfiniBand: the links stay the assumed ones
of the closest ``GPU_SPECS`` kind, and ``source`` and ``notes`` say so.

``quick=True`` runs every part once on tiny shapes, on any device: a rehearsal of the code
path (on the CPU in the tests), not a calibration; its ``source`` says so.
"""

from __future__ import annotations

import contextlib
from typing import Tuple

import torch

from megatron_helix.perf.calibration import Calibration, gpu_calibration
from megatron_helix.perf.cpu_calibration import (
    CPU_SIZES,
    QUICK_SIZES,
    Sizes,
    cpu_name,
    measure_rates,
    one_thread,
)

# Estimated time of one H100/H200 (bf16, ~600 TFLOP/s achieved on large GEMMs, ~3 TB/s):
# ~25 s in all, within the 2 minutes the measurement is allowed.
GPU_SIZES = Sizes(
    # The GEMMs of the seed workloads' layer passes (hidden 4096/8192, MLP 16384/32768, split
    # by TP up to 16; 1k-16k tokens per micro-batch and rank), forward (T, N, K) and backward
    # (T, K, N), (K, N, T); a query takes the nearest shape in log space. 216 shapes, sum of
    # FLOPs 2.5e14 per sweep, 7 sweeps (2 warm-up, 5 timed): ~5 s with the allocations.
    gemm=tuple((m, n, k) for m in (512, 1024, 2048, 4096, 8192, 16384)
               for n in (256, 1024, 4096, 8192, 16384, 32768)
               for k in (256, 1024, 4096, 8192, 16384, 32768)),
    # (batch x heads, seq, head_dim): head dims 128 and the score all-reduce's slices d/m
    # (64, 32); 1k-16k tokens (ring blocks are the shorter ones). Forward FLOPs 8.6e11 per
    # kernel and sweep; with backward, all four kernels (the score all-reduce at the fp32
    # rate, the unfused kernel memory-bound: ~20 GB of scores at 16k) ~0.2 s per sweep, ~10
    # sweeps: ~5 s with the first calls.
    attention=((16, 1024, 128), (64, 2048, 128), (32, 4096, 128), (32, 4096, 64),
               (32, 4096, 32), (8, 16384, 128)),
    # 256 MiB bf16: layer norm, GELU, add, 11 calls each: < 1 s.
    elementwise=(16384, 8192),
    # ~100 steps of a hidden-16 layer, forward + backward, a few ms each: < 1 s.
    # The rest: importing torch and Megatron, CUDA and NCCL start-up: ~15 s.
)


def closest_gpu(name: str) -> str:
    """The ``GPU_SPECS`` kind whose assumed links stand in for ``name``'s (H100 by default)."""
    return "h200" if "H200" in name.upper() else "h100"


def _cuda_description(device: torch.device) -> Tuple[str, str, int]:
    """(name, notes, memory bytes) of the GPU ``device``."""
    props = torch.cuda.get_device_properties(device)
    notes = (f"{props.name}: {props.multi_processor_count} SMs, "
             f"{props.total_memory / 2**30:.0f} GiB, compute capability "
             f"{props.major}.{props.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    return props.name, notes, props.total_memory


def measure_device(device: torch.device | str = "cuda", quick: bool = False) -> Calibration:
    """``device``'s measured compute rates (bf16 on a GPU, fp32 on one CPU thread) with the
    assumed links of the closest GPU kind (see the module docstring)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None
                              else device.index)
        name, notes, memory = _cuda_description(device)
    else:
        name, notes, memory = cpu_name(), "one thread", 0
    dtype_name = "bf16" if cuda else "fp32"
    with contextlib.nullcontext() if cuda else one_thread():
        rates = measure_rates(QUICK_SIZES if quick else GPU_SIZES if cuda else CPU_SIZES, device,
                              torch.bfloat16 if cuda else torch.float32)
    kind = closest_gpu(name)
    assumed = gpu_calibration(kind, dtype_name)
    measured = ("quick rehearsal (tiny shapes, 1 repeat; not a calibration) on" if quick
                else "measured on")
    return Calibration(
        name=name, dtype=dtype_name,
        source=f"compute {measured} {name}; links assumed ({kind.upper()} NVLink/InfiniBand)",
        links=assumed.links, overlap=True, parallel_capacity=0.0, memory_bytes=memory,
        notes=f"{notes}; links not measured (one device): NVLink/InfiniBand are this "
              f"project's assumptions for {kind.upper()} (gpu_calibration)",
        **rates,
    )

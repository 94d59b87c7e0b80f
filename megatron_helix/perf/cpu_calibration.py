"""Measure a device's rates for the cost model; on a CPU one thread per rank, as the trainer runs.

- GEMMs over a grid of shapes (``torch.matmul``; fp32 on the CPU);
- each attention kernel the plugin runs, forward and backward, over a grid of
  ``(batch x heads, seq, head_dim)``: the flash block kernel (ring blocks; its explicit forward
  and backward, as the ring calls them), Megatron's unfused ``DotProductAttention``, the score
  all-reduce and redistribute strategies' local compute (on a one-rank group, so no
  communication is timed);
- element-wise kernels (norm, GELU, add; bytes/s);
- Megatron's framework overhead per layer pass: a ``TransformerLayer`` of hidden size 16,
  whose arithmetic is negligible.

Every kernel takes a ``device`` and a ``dtype``: ``measure_cpu`` runs them on this CPU,
``device_calibration`` on a GPU (timed with CUDA events). Megatron modules need
``torch.distributed``: a one-rank group (gloo; NCCL on CUDA) is created (and removed) when
none exists.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_helix.perf.calibration import (
    AttentionRate,
    Calibration,
    ShapeRate,
    flash_attention_flops,
)


@dataclass(frozen=True)
class Sizes:
    """What one calibration measures: the GEMM shapes ``(m, n, k)``, the attention shapes
    ``(batch x heads, seq, head_dim)``, the element-wise tensor, and the timed repeats (each
    after up to 2 warm-up calls; the layer overhead: ``overhead_repeats`` x ``overhead_rounds``)."""

    gemm: Tuple[Tuple[int, int, int], ...]
    attention: Tuple[Tuple[int, int, int], ...]
    elementwise: Tuple[int, int]
    repeats: int = 5
    elementwise_repeats: int = 9
    overhead_repeats: int = 31
    overhead_rounds: int = 3


CPU_SIZES = Sizes(
    gemm=tuple((m, n, k) for m in (128, 512, 2048) for n in (16, 64, 256, 1024)
               for k in (16, 64, 256, 1024)),
    attention=((2, 128, 32), (2, 512, 16), (2, 512, 32), (4, 256, 32), (8, 512, 32),
               (4, 1024, 32), (8, 512, 64)),
    elementwise=(512, 1024))
# --quick: every part once on tiny shapes: a rehearsal of the code path, not a calibration.
QUICK_SIZES = Sizes(gemm=((64, 64, 64), (128, 256, 64)), attention=((2, 64, 16), (2, 128, 32)),
                    elementwise=(64, 256), repeats=1, elementwise_repeats=1, overhead_repeats=1,
                    overhead_rounds=1)


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 2,
                   device: torch.device | str = "cpu") -> float:
    """Median time of ``fn`` over ``repeats`` after ``warmup`` calls: wall time on the CPU; on
    CUDA between two events recorded around it on the current stream (the GPU's time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if _is_cuda(device):
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def cpu_model_name() -> str:
    """``lscpu``'s model name (``platform.processor()`` without lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def measure_gemm_table(shapes=CPU_SIZES.gemm, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32,
                       repeats: int = 5) -> Tuple[ShapeRate, ...]:
    table = []
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        seconds = median_seconds(lambda: torch.matmul(a, b), repeats, min(repeats, 2), device)
        table.append(ShapeRate((m, n, k), 2.0 * m * n * k / seconds))
    return tuple(table)


# ------------------------------------------------------------------- attention kernels


@contextlib.contextmanager
def _one_rank_megatron(device: torch.device | str = "cpu") -> Iterator[None]:
    """Megatron's parallel state on a one-rank group (created only if none exists): gloo on
    the CPU, NCCL on CUDA (so the score all-reduce's one-rank all-reduce stays on the GPU)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_helix.cpu import enable_cpu_execution

    if _is_cuda(device):
        torch.cuda.set_device(torch.device(device))
    else:
        enable_cpu_execution()
    with tempfile.TemporaryDirectory() as store:
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("nccl" if _is_cuda(device) else "gloo",
                                    init_method=f"file://{store}/rendezvous", rank=0,
                                    world_size=1)
        mpu.initialize_model_parallel()
        model_parallel_cuda_manual_seed(1, inference_rng_tracker=True)
        try:
            yield
        finally:
            mpu.destroy_model_parallel()
            if owned:
                dist.destroy_process_group()


def _config(heads: int, head_dim: int, dtype: torch.dtype = torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    # Megatron's fused soft-max is a separately built extension; without it, torch's.
    fused_softmax = importlib.util.find_spec("scaled_upper_triang_masked_softmax_cuda") is not None
    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             use_cpu_initialization=True, attention_dropout=0.0,
                             hidden_dropout=0.0, params_dtype=dtype,
                             bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                             masked_softmax_fusion=fused_softmax)


Kernel = Callable[[torch.Tensor], Tuple[Callable[[], object], Optional[Callable[[], object]]]]


def _flash(q: torch.Tensor):
    """The ring's block kernel: its forward, and its explicit backward (no autograd)."""
    from megatron_helix.attention.block_kernel import (
        block_attention_backward,
        block_attention_forward,
    )

    q, scale = q.detach(), q.shape[-1] ** -0.5
    out, lse = block_attention_forward(q, q, q, True, scale)
    dout = torch.randn_like(out)
    return (lambda: block_attention_forward(q, q, q, True, scale),
            lambda: block_attention_backward(dout, q, q, q, out, lse, True, scale))


def _autograd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Kernel:
    """A kernel timed forward, and backward as forward + backward minus forward."""
    return lambda q: (lambda: fn(q), None)


def _unfused(heads: int, dim: int, dtype: torch.dtype) -> Kernel:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    module = DotProductAttention(_config(heads, dim, dtype), 1, AttnMaskType.causal, "self")
    return _autograd(lambda q: module(q, q, q, None))


def _score_allreduce(q: torch.Tensor) -> torch.Tensor:
    """Partial scores in fp32 whatever ``q``'s dtype (the kernel's own upcast; the cost
    model prices this kernel at the fp32 rate)."""
    from megatron_helix.attention.score_allreduce import score_allreduce_attention

    return score_allreduce_attention(q, q, q, dist.group.WORLD, causal=True)


def _redistribute(q: torch.Tensor, m: int = 2) -> torch.Tensor:
    """Rank 0's work under redistribute with ``m = 2``: query chunks 0 and ``2m - 1`` of
    ``2m`` attend their key prefixes with the full head dim (``q`` holds the whole head)."""
    from megatron_helix.attention.sdpa import sdpa_attention

    c = q.shape[0] // (2 * m)
    last = 2 * m - 1
    return torch.cat([sdpa_attention(q[:c], q[:c], q[:c], True, 1.0),
                      sdpa_attention(q[last * c:], q, q, True, 1.0)])


def _attention_rate(kernel: Kernel, shape: Tuple[int, int, int], device: torch.device | str,
                    dtype: torch.dtype, queries: float = 1.0, repeats: int = 5) -> AttentionRate:
    """Forward and backward FLOP/s of ``kernel`` on q = k = v ``[s, 1, bh, d]``; ``queries``:
    the share of the causal work the kernel does (redistribute's rank: ``1/m``)."""
    heads, seq, dim = shape
    q = torch.randn(seq, 1, heads, dim, device=device, dtype=dtype, requires_grad=True)
    forward_fn, backward_fn = kernel(q)
    warmup = min(repeats, 2)
    forward = median_seconds(forward_fn, repeats, warmup, device)
    if backward_fn is not None:
        backward = median_seconds(backward_fn, repeats, warmup, device)
    else:
        def both():
            q.grad = None
            forward_fn().sum().backward()

        backward = max(median_seconds(both, repeats, warmup, device) - forward, 1e-9)
    flops = queries * flash_attention_flops(heads, seq, seq, dim, True, backward=False)
    return AttentionRate(shape, flops / forward, 2.5 * flops / backward)


def measure_attention_tables(shapes=CPU_SIZES.attention, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32,
                             repeats: int = 5) -> Dict[str, Tuple[AttentionRate, ...]]:
    """Every kernel of ``ATTENTION_KERNELS`` forward and backward at each shape, inputs in
    ``dtype`` (the score all-reduce upcasts its partial scores to fp32 itself)."""
    def rates(kernel: Callable[[Tuple[int, int, int]], Kernel], queries: float = 1.0):
        return tuple(_attention_rate(kernel(shape), shape, device, dtype, queries, repeats)
                     for shape in shapes)

    with _one_rank_megatron(device):
        return {
            "flash": rates(lambda shape: _flash),
            "unfused": rates(lambda shape: _unfused(shape[0], shape[2], dtype)),
            "score_allreduce": rates(lambda shape: _autograd(_score_allreduce)),
            "redistribute": rates(lambda shape: _autograd(_redistribute), queries=0.5),
        }


# ------------------------------------------------------------ element-wise and overhead


def measure_elementwise(shape: Tuple[int, int] = CPU_SIZES.elementwise,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        repeats: int = 9) -> float:
    """Bytes/s (read + write) of layer norm, GELU and add on an activation-sized tensor."""
    import torch.nn.functional as F

    x = torch.randn(*shape, device=device, dtype=dtype)
    kernels = ((lambda: F.layer_norm(x, shape[-1:]), 2), (lambda: F.gelu(x), 2),
               (lambda: x + x, 3))
    return statistics.median(
        passes * x.numel() * x.element_size() / median_seconds(fn, repeats, 2, device)
        for fn, passes in kernels)


def measure_layer_overhead(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                           repeats: int = 31, rounds: int = 3) -> float:
    """Seconds per layer pass (half a forward + backward) of a Megatron ``TransformerLayer``
    with hidden size 16 and 8 tokens: dispatch, launches and autograd bookkeeping, no
    arithmetic. Wall time (on CUDA synchronized after each step): launches are the cost."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    with _one_rank_megatron(device):
        layer = build_module(get_gpt_layer_local_spec(), config=_config(4, 4, dtype),
                             layer_number=1).to(device=device, dtype=dtype)
        x = torch.randn(8, 1, 16, device=device, dtype=dtype, requires_grad=True)

        def step():
            layer(x, attention_mask=None)[0].sum().backward()
            if _is_cuda(device):
                torch.cuda.synchronize(device)

        return statistics.median(median_seconds(step, repeats, min(repeats, 5))
                                 for _ in range(rounds)) / 2


def measure_rates(sizes: Sizes = CPU_SIZES, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> dict:
    """The compute fields of a ``Calibration`` measured on ``device`` in ``dtype``."""
    return dict(
        gemm_table=measure_gemm_table(sizes.gemm, device, dtype, sizes.repeats),
        attention_tables=measure_attention_tables(sizes.attention, device, dtype, sizes.repeats),
        elementwise_bytes_per_s=measure_elementwise(sizes.elementwise, device, dtype,
                                                    sizes.elementwise_repeats),
        layer_overhead_s=measure_layer_overhead(device, dtype, sizes.overhead_repeats,
                                                sizes.overhead_rounds),
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread, as each trainer rank runs (``OMP_NUM_THREADS=1``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cpu_name() -> str:
    return f"cpu: {cpu_model_name()} ({os.cpu_count()} cores)"


def measure_cpu() -> Calibration:
    """This CPU's compute rates on one thread, as each trainer rank runs (the links and the
    parallel capacity are measured on several ranks: ``bench.calibrate``)."""
    with one_thread():
        return Calibration(name=cpu_name(), source="measured (1 thread per rank)", dtype="fp32",
                           overlap=False, **measure_rates(CPU_SIZES))

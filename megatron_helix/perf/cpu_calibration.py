"""Measure this CPU's rates for the cost model: one thread per rank, as the trainer runs.

- GEMMs over a grid of shapes (``torch.matmul``, fp32);
- each attention kernel the plugin runs, forward and backward, over a grid of
  ``(batch x heads, seq, head_dim)``: torch's flash kernel (ring blocks), Megatron's unfused
  ``DotProductAttention``, the score all-reduce and redistribute strategies' local compute
  (on a one-rank group, so no communication is timed);
- element-wise kernels (norm, GELU, add; bytes/s);
- Megatron's framework overhead per layer pass: a ``TransformerLayer`` of hidden size 16,
  whose arithmetic is negligible.

Megatron modules need ``torch.distributed``: a one-rank gloo group is created (and removed)
when none exists.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Dict, Iterator, Tuple

import torch
import torch.distributed as dist

from megatron_helix.perf.calibration import (
    AttentionRate,
    Calibration,
    ShapeRate,
    flash_attention_flops,
)

GEMM_SHAPES = tuple((m, n, k) for m in (128, 512, 2048) for n in (16, 64, 256, 1024)
                    for k in (16, 64, 256, 1024))
ATTENTION_SHAPES = ((2, 128, 32), (2, 512, 16), (2, 512, 32), (4, 256, 32), (8, 512, 32),
                    (4, 1024, 32), (8, 512, 64))


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
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


def measure_gemm_table(shapes=GEMM_SHAPES) -> Tuple[ShapeRate, ...]:
    table = []
    for m, n, k in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds = median_seconds(lambda: torch.matmul(a, b))
        table.append(ShapeRate((m, n, k), 2.0 * m * n * k / seconds))
    return tuple(table)


# ------------------------------------------------------------------- attention kernels


@contextlib.contextmanager
def _one_rank_megatron() -> Iterator[None]:
    """Megatron's parallel state on a one-rank gloo group (created only if none exists)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_helix.cpu import enable_cpu_execution

    enable_cpu_execution()
    with tempfile.TemporaryDirectory() as store:
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo", init_method=f"file://{store}/rendezvous", rank=0,
                                    world_size=1)
        mpu.initialize_model_parallel()
        model_parallel_cuda_manual_seed(1, inference_rng_tracker=True)
        try:
            yield
        finally:
            mpu.destroy_model_parallel()
            if owned:
                dist.destroy_process_group()


def _config(heads: int, head_dim: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             use_cpu_initialization=True, attention_dropout=0.0,
                             hidden_dropout=0.0)


def _flash(q: torch.Tensor) -> torch.Tensor:
    from megatron_helix.attention.block_kernel import block_attention_forward

    return block_attention_forward(q, q, q, True, q.shape[-1] ** -0.5)[0]


def _unfused(heads: int, dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    module = DotProductAttention(_config(heads, dim), 1, AttnMaskType.causal, "self")
    return lambda q: module(q, q, q, None)


def _score_allreduce(q: torch.Tensor) -> torch.Tensor:
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


def _attention_rate(kernel: Callable[[torch.Tensor], torch.Tensor], shape: Tuple[int, int, int],
                    queries: float = 1.0) -> AttentionRate:
    """Forward and backward FLOP/s of ``kernel`` on q = k = v ``[s, 1, bh, d]``; ``queries``:
    the share of the causal work the kernel does (redistribute's rank: ``1/m``)."""
    heads, seq, dim = shape
    q = torch.randn(seq, 1, heads, dim, requires_grad=True)
    forward = median_seconds(lambda: kernel(q))

    def both():
        kernel(q).sum().backward()

    backward = max(median_seconds(both) - forward, 1e-9)
    flops = queries * flash_attention_flops(heads, seq, seq, dim, True, backward=False)
    return AttentionRate(shape, flops / forward, 2.5 * flops / backward)


def measure_attention_tables(shapes=ATTENTION_SHAPES) -> Dict[str, Tuple[AttentionRate, ...]]:
    with _one_rank_megatron():
        tables = {
            "flash": [_attention_rate(_flash, shape) for shape in shapes],
            "unfused": [_attention_rate(_unfused(shape[0], shape[2]), shape) for shape in shapes],
            "score_allreduce": [_attention_rate(_score_allreduce, shape) for shape in shapes],
            "redistribute": [_attention_rate(_redistribute, shape, queries=0.5)
                             for shape in shapes],
        }
    return {kernel: tuple(rates) for kernel, rates in tables.items()}


# ------------------------------------------------------------ element-wise and overhead


def measure_elementwise() -> float:
    """Bytes/s (read + write) of layer norm, GELU and add on activation-sized tensors."""
    import torch.nn.functional as F

    x = torch.randn(512, 1024)
    kernels = ((lambda: F.layer_norm(x, (1024,)), 2), (lambda: F.gelu(x), 2), (lambda: x + x, 3))
    return statistics.median(passes * x.numel() * x.element_size() / median_seconds(fn, 9)
                             for fn, passes in kernels)


def measure_layer_overhead() -> float:
    """Seconds per layer pass (half a forward + backward) of a Megatron ``TransformerLayer``
    with hidden size 16 and 8 tokens: dispatch and autograd bookkeeping, no arithmetic."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    with _one_rank_megatron():
        layer = build_module(get_gpt_layer_local_spec(), config=_config(4, 4), layer_number=1)
        x = torch.randn(8, 1, 16, requires_grad=True)

        def step():
            layer(x, attention_mask=None)[0].sum().backward()

        return statistics.median(median_seconds(step, repeats=31, warmup=5)
                                 for _ in range(3)) / 2


def measure_cpu() -> Calibration:
    """This CPU's compute rates on one thread, as each trainer rank runs (the links and the
    parallel capacity are measured on several ranks: ``bench.calibrate``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Calibration(
            name=f"cpu: {cpu_model_name()} ({os.cpu_count()} cores)",
            source="measured (1 thread per rank)", dtype="fp32",
            gemm_table=measure_gemm_table(), attention_tables=measure_attention_tables(),
            elementwise_bytes_per_s=measure_elementwise(),
            layer_overhead_s=measure_layer_overhead(), overlap=False,
        )
    finally:
        torch.set_num_threads(threads)

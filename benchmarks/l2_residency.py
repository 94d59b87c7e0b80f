"""Decode-like forward of one transformer layer, with and without its weights persisting in L2.

Needs one CUDA GPU of compute capability >= 8.0 (an H100 or H200); from the repository root:

    python -m benchmarks.l2_residency --out l2_residency.json

Three conditions, each timed step by step with CUDA events on one created stream:

- ``warm``: the layer alone, step after step; its weights stay in L2 by recency (the ceiling).
- ``evicted``: before each step a copy streams ``--evict-mib`` through L2, as the other layers,
  the KV cache and the activations of a real pipeline stage do (the floor).
- ``resident``: the same eviction traffic, with the layer's weights in a persisting
  access-policy window (``megatron_helix.l2_residency``).

Only the layer's step lies between the events; the eviction copy runs before the start event.
The default layer (hidden 1024, MLP 4096, fp16: 25.2 MB of weights) fits the 37.5 MiB
persisting set-aside an H100 reports. ``--device cpu`` runs the same code as a smoke test; its
timings say nothing about L2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_helix.l2_residency import flatten_parameters, l2_persisting


class DecodeLayer(torch.nn.Module):
    """Pre-norm GPT layer for one new token per sequence against a fixed KV cache.

    Shapes: input ``[b, 1, D]``; cache ``[b, H, context, D / H]`` (read, never written, so every
    step does the same work).
    """

    def __init__(self, hidden: int, ffn: int, heads: int, batch: int, context: int):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.norm2 = torch.nn.LayerNorm(hidden)
        self.fc1 = torch.nn.Linear(hidden, ffn, bias=False)
        self.fc2 = torch.nn.Linear(ffn, hidden, bias=False)
        cache = (batch, heads, context, hidden // heads)
        self.register_buffer("keys", torch.randn(cache), persistent=False)
        self.register_buffer("values", torch.randn(cache), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, hidden = x.shape
        q = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1)[:, :, 0].transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, self.keys, self.values)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, s, hidden))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def step_timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """Milliseconds one call takes: CUDA events on the current stream, or wall time on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(step: Callable[[], None]) -> float:
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(step: Callable[[], None]) -> float:
            begin = time.perf_counter()
            step()
            return (time.perf_counter() - begin) * 1e3
    return timed


def measure(layer, x, steps, warmup, evict, timer) -> Dict[str, float]:
    """Median and spread of ``steps`` timed steps after ``warmup`` untimed ones."""
    times: List[float] = []
    for index in range(warmup + steps):
        if evict is not None:
            evict[1].copy_(evict[0])
        elapsed = timer(lambda: layer(x))
        if index >= warmup:
            times.append(elapsed)
    deciles = statistics.quantiles(times, n=10)
    return {"median_us": statistics.median(times) * 1e3,
            "p10_us": deciles[0] * 1e3, "p90_us": deciles[-1] * 1e3}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="sequences, one new token each")
    parser.add_argument("--context", type=int, default=512, help="cached tokens per sequence")
    parser.add_argument("--evict-mib", type=int, default=200, help="L2 traffic between steps")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --device cpu for a smoke test")
        return 2
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = DecodeLayer(args.hidden, args.ffn, args.heads, args.batch, args.context)
    layer = layer.to(device=device, dtype=dtype).eval()
    weights = flatten_parameters(layer)
    x = torch.randn(args.batch, 1, args.hidden, device=device, dtype=dtype)
    source = torch.empty(args.evict_mib * 2**20 // 2, dtype=torch.uint8, device=device)
    evict = (source, torch.empty_like(source))
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    timer = step_timer(device)

    results: Dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if stream else "cpu (smoke test)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "config": vars(args),
        "weight_bytes": weights.numel(),  # the flattened buffer, 256-byte aligned views
    }
    on_stream = torch.cuda.stream(stream) if stream else contextlib.nullcontext()
    with torch.no_grad(), on_stream:
        results["warm"] = measure(layer, x, args.steps, args.warmup, None, timer)
        results["evicted"] = measure(layer, x, args.steps, args.warmup, evict, timer)
        handle = stream.cuda_stream if stream else None
        with l2_persisting(weights, stream=handle) as residency:
            results["residency"] = residency and dataclasses.asdict(residency)
            results["resident"] = measure(layer, x, args.steps, args.warmup, evict, timer)

    for condition in ("warm", "evicted", "resident"):
        timing = results[condition]
        print(f"{condition:>9}: median {timing['median_us']:9.1f} us  "
              f"(p10 {timing['p10_us']:.1f}, p90 {timing['p90_us']:.1f})")
    print(f"weights {results['weight_bytes']:,} B; residency {results['residency']}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

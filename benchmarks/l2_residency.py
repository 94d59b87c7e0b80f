"""Decode step of one transformer layer, with and without its weights persisting in L2.

Needs one CUDA GPU of compute capability >= 8.0 (an H100 or H200); from the repository root:

    python -m benchmarks.l2_residency --out l2_residency.json

The step (about a dozen small kernels) is captured in a CUDA graph, so launch time does not
hide the few microseconds it takes to read the weights. Three modes, interleaved round by round
(evicted, resident, warm, evicted, ...), on the same input; each round replays the graph once
untimed (it loads the weights), then times one replay with CUDA events:

- ``evicted``: between the two replays a copy streams ``--evict-mib`` through L2, as the other
  layers, the KV cache and the activations of a real pipeline stage do (the floor).
- ``resident``: the same eviction, with the weights in a persisting access-policy window
  (``megatron_helix.l2_residency.l2_persisting``) for the whole round.
- ``warm``: no eviction; the weights stay in L2 by recency (the ceiling).

The resident mode replays its own graph, captured with the window set on the capture stream
and replayed with it set, so the window is in place whichever of the two the kernels take it
from; each resident round ends by dropping the persisting lines (``l2_persisting``'s exit), so
the other modes never hit them. A spin kernel keeps the GPU busy while the CPU enqueues each
timed replay, so launch latency falls outside the events in every mode. ``speedup`` is evicted over resident (medians), and
``ceiling`` evicted over warm. The layer is sized at run time from the device: the widest
``--hidden`` (multiple of 128, MLP 4x) whose weights fill at most ``--fill`` of the most L2 the
device lets a process set aside for persisting accesses; the eviction defaults to 4x the L2.

``--device cpu`` runs the same rounds eagerly (no graph, no window: the window is a no-op
there) with tiny sizes, to rehearse the code; it reports that the residency effect was not
measurable. ``--machine`` only records the machine (GPU, SMs, L2 and persisting L2, clocks,
driver, versions), for ``benchmarks/gpu_checks.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import subprocess
import time
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_helix.l2_residency import (
    CudaRuntimeError,
    default_runtime,
    flatten_parameters,
    l2_persisting,
)

MODES = ("evicted", "resident", "warm")
CPU_HIDDEN, CPU_EVICT_MIB = 128, 4  # --device cpu defaults: a rehearsal, not a measurement
SPIN_CYCLES = 100_000  # about 50 us at H100/H200 clocks: longer than enqueueing one replay


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


def weight_bytes(hidden: int, ffn: int, element_size: int) -> int:
    """Bytes of ``DecodeLayer``'s parameters: four ``D x D`` projections, the MLP's two
    ``D x F`` ones, and two LayerNorms' weight and bias."""
    return (4 * hidden * hidden + 2 * hidden * ffn + 4 * hidden) * element_size


def l2_sizes(device: torch.device) -> Tuple[int, int]:
    """The device's L2 bytes and the most of it a process may set aside for persisting
    accesses: torch's device properties where they carry it, else the CUDA runtime's
    ``cudaDevAttrMaxPersistingL2CacheSize``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    persisting = getattr(props, "persisting_l2_cache_max_size", None)
    if persisting is None:
        runtime = default_runtime()
        error, persisting = runtime.cudaDeviceGetAttribute(
            runtime.cudaDeviceAttr.cudaDevAttrMaxPersistingL2CacheSize, index)
        if error != runtime.cudaError_t.cudaSuccess:
            raise CudaRuntimeError(f"cudaDeviceGetAttribute failed with {error}")
    return props.L2_cache_size, int(persisting)


def machine_facts() -> Dict[str, object]:
    """The machine a run measured: torch and CUDA versions; on a GPU its name, capability,
    SM count, memory, L2 and most persisting L2 (device 0), and ``nvidia-smi``'s clocks,
    power limit and driver."""
    facts: Dict[str, object] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                                "gpu": None, "nvidia_smi": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = facts["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                              "sm_count": props.multi_processor_count,
                              "memory_bytes": props.total_memory,
                              "l2_bytes": props.L2_cache_size}
        try:
            gpu["max_persisting_l2_bytes"] = l2_sizes(torch.device("cuda", 0))[1]
        except (CudaRuntimeError, OSError) as error:  # recorded; the other facts still are
            gpu["max_persisting_l2_bytes"] = f"unavailable: {error}"
    query = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,"
             "clocks.max.mem,power.limit")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lines = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                               capture_output=True, text=True, check=True, timeout=20).stdout
        facts["nvidia_smi"] = [dict(zip(query.split(","), map(str.strip, line.split(","))))
                               for line in lines.splitlines()]
    return facts


def widest_hidden(set_aside: int, fill: float, element_size: int) -> int:
    """The widest hidden size, a multiple of 128 with a 4x MLP, whose weights take at most
    ``fill`` of ``set_aside`` bytes."""
    hidden = 128
    while weight_bytes(hidden + 128, 4 * (hidden + 128), element_size) <= fill * set_aside:
        hidden += 128
    return hidden


class Replay:
    """One call of the layer on a static input: a CUDA graph replay on a GPU, the eager
    forward on CPU. ``capture`` records the graph on ``stream`` (after warm-up steps on it, as
    ``torch.cuda.graphs`` documents), under whatever L2 window the stream has then."""

    def __init__(self, layer: torch.nn.Module, x: torch.Tensor,
                 stream: Optional[torch.cuda.Stream]):
        self.layer, self.x, self.stream = layer, x, stream
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.output: Optional[torch.Tensor] = None  # the graph's static output

    def capture(self) -> None:
        if self.stream is None:
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(3):
                self.layer(self.x)
        torch.cuda.current_stream().wait_stream(self.stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.output = self.layer(self.x)

    def __call__(self) -> None:
        if self.graph is None:
            self.layer(self.x)
        else:
            self.graph.replay()


def timed(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """Microseconds one call takes: CUDA events on the current stream, behind a spin kernel
    that hides the enqueueing; wall time on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def elapsed(step: Callable[[], None]) -> float:
            torch.cuda._sleep(SPIN_CYCLES)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3
    else:
        def elapsed(step: Callable[[], None]) -> float:
            begin = time.perf_counter()
            step()
            return (time.perf_counter() - begin) * 1e6
    return elapsed


def summary(times: Sequence[float]) -> Dict[str, float]:
    """Median, 10th and 90th percentile of ``times`` (microseconds)."""
    deciles = statistics.quantiles(times, n=10)
    return {"median_us": statistics.median(times), "p10_us": deciles[0], "p90_us": deciles[-1]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int,
                        help="default: the widest that fits --fill of the persisting set-aside")
    parser.add_argument("--ffn", type=int, help="default: 4 x hidden")
    parser.add_argument("--fill", type=float, default=0.8,
                        help="share of the persisting set-aside the default layer may take")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="sequences, one new token each")
    parser.add_argument("--context", type=int, default=512, help="cached tokens per sequence")
    parser.add_argument("--evict-mib", type=int, help="L2 traffic between replays (4x L2)")
    parser.add_argument("--steps", type=int, default=300, help="timed rounds per mode")
    parser.add_argument("--warmup", type=int, default=20, help="untimed rounds per mode")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--machine", action="store_true",
                        help="only record the machine (GPU, SMs, L2, clocks, driver, versions)")
    args = parser.parse_args(argv)
    if args.machine:
        facts = machine_facts()
        print(json.dumps(facts, indent=2))
        return write(facts, args.out)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --device cpu for a rehearsal")
        return 2
    results = measure(args, device)
    for mode in MODES:
        timing = results[mode]
        print(f"{mode:>9}: median {timing['median_us']:9.1f} us  "
              f"(p10 {timing['p10_us']:.1f}, p90 {timing['p90_us']:.1f})")
    print(f"speedup (evicted / resident) {results['speedup']:.3f}, "
          f"ceiling (evicted / warm) {results['ceiling']:.3f}")
    print(results.get("note") or
          f"weights {results['weight_bytes']:,} B, L2 {results['l2_bytes']:,} B, max persisting "
          f"{results['max_persisting_l2_bytes']:,} B; residency {results['residency']}")
    return write(results, args.out)


def measure(args: argparse.Namespace, device: torch.device) -> Dict[str, object]:
    """Size the layer (filling in ``args``' defaults), capture it, and time the interleaved
    rounds of every mode; the results as ``main`` writes them."""
    on_gpu = device.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    l2_bytes, set_aside = l2_sizes(device) if on_gpu else (None, None)
    if args.hidden is None:
        args.hidden = (widest_hidden(set_aside, args.fill, torch.finfo(dtype).bits // 8)
                       if on_gpu else CPU_HIDDEN)
    args.ffn = args.ffn or 4 * args.hidden
    if args.evict_mib is None:
        args.evict_mib = 4 * l2_bytes // 2**20 if on_gpu else CPU_EVICT_MIB

    torch.manual_seed(0)
    layer = DecodeLayer(args.hidden, args.ffn, args.heads, args.batch, args.context)
    layer = layer.to(device=device, dtype=dtype).eval()
    weights = flatten_parameters(layer)
    x = torch.randn(args.batch, 1, args.hidden, device=device, dtype=dtype)
    source = torch.empty(args.evict_mib * 2**20 // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    stream = torch.cuda.Stream(device) if on_gpu else None
    handle = stream.cuda_stream if stream else None
    plain, persisting = Replay(layer, x, stream), Replay(layer, x, stream)
    windows: Dict[str, Callable[[], ContextManager]] = {
        "evicted": contextlib.nullcontext, "warm": contextlib.nullcontext,
        "resident": lambda: l2_persisting(weights, stream=handle)}
    replays = {"evicted": plain, "warm": plain, "resident": persisting}
    elapsed = timed(device)
    times: Dict[str, List[float]] = {mode: [] for mode in MODES}
    on_stream = torch.cuda.stream(stream) if stream else contextlib.nullcontext()
    with torch.no_grad():
        plain.capture()
        with windows["resident"]() as residency:
            persisting.capture()
        with on_stream:
            for index in range(args.warmup + args.steps):
                for mode in MODES:
                    with windows[mode]():
                        replays[mode]()  # loads the weights (and marks them persisting)
                        if mode != "warm":
                            target.copy_(source)
                        step_us = elapsed(replays[mode])
                    if index >= args.warmup:
                        times[mode].append(step_us)

    timings = {mode: summary(times[mode]) for mode in MODES}
    results: Dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (rehearsal)",
        "machine": machine_facts(), "config": vars(args), "l2_bytes": l2_bytes,
        "max_persisting_l2_bytes": set_aside,
        "weight_bytes": weights.numel(),  # the flattened buffer, 256-byte aligned views
        "cuda_graph": on_gpu, "residency": residency and dataclasses.asdict(residency),
        **timings,
        "speedup": timings["evicted"]["median_us"] / timings["resident"]["median_us"],
        "ceiling": timings["evicted"]["median_us"] / timings["warm"]["median_us"],
    }
    if not on_gpu:
        results["note"] = ("cpu: eager step, no CUDA graph, no persisting window; the L2 "
                           "residency effect was not measurable here")
    return results


def write(results: Dict[str, object], path: Optional[str]) -> int:
    """Write ``results`` as JSON to ``path``, if one is given; exit status 0."""
    if path:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

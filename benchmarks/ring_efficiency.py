"""How close ring attention's compute gets to one monolithic attention call of the same work.

On one device this runs every block of an ``R``-rank ring exactly as the ring would (zigzag
shards, the causal skipping of ``zigzag_block``, the same kernel, the fp32 LSE merge, the fp32
dq/dk/dv accumulation; ``R x R`` steps in all) and compares it with a single flash attention
call over the full sequence. Communication is excluded: this measures what cutting attention
into ring blocks costs in kernel efficiency (smaller GEMMs, merge and accumulation passes), the
part that overlap cannot hide.

FLOPs: ``4 b h s^2 d`` forward, half of it causal; forward + backward ``3.5x`` the forward (the
backward's five ``s^2 d`` matmuls, as FlashAttention counts them). Both sides do the same FLOPs,
so the efficiency printed (ring TFLOP/s over monolithic TFLOP/s) is the inverse time ratio.

    python -m benchmarks.ring_efficiency --seq-len 4096 --ring-size 8 --dtype fp32 --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Sequence

import torch

from megatron_helix.attention.block_kernel import (
    KERNEL_CHOICES,
    block_attention_backward,
    block_attention_forward,
    select_kernel,
)
from megatron_helix.attention.ring_attention import backward_step, forward_step
from megatron_helix.attention.zigzag import (
    check_zigzag_length,
    zigzag_block,
    zigzag_shard,
    zigzag_unshard,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MASKS = {"causal": (True,), "full": (False,), "both": (True, False)}  # --mask: causal flags


def _ring_forward_all_ranks(shards, causal, scale, kernel):
    """Forward of every rank: ``R`` steps each over the visiting k/v shards -> [(out, lse)]."""
    ring_size = len(shards)
    results = []
    for rank, (q, _) in enumerate(shards):
        out = lse = None
        for step in range(ring_size):
            source = (rank - step) % ring_size
            block = zigzag_block(rank, source, q.shape[0], causal)
            out, lse = forward_step(q, shards[source][1], block, scale, out, lse, kernel)
        results.append((out.to(q.dtype), lse))
    return results


def _ring_backward_all_ranks(shards, douts, forward, causal, scale, kernel):
    """Backward of every rank: dq local in fp32, dk/dv accumulated in fp32 per source shard."""
    ring_size = len(shards)
    dqs = []
    dkvs = [torch.zeros_like(kv, dtype=torch.float32) for _, kv in shards]
    for rank, ((q, _), dout, (out, lse)) in enumerate(zip(shards, douts, forward)):
        dq = torch.zeros_like(q, dtype=torch.float32)
        for step in range(ring_size):
            source = (rank - step) % ring_size
            kv = shards[source][1]
            block = zigzag_block(rank, source, q.shape[0], causal)
            dk, dv = backward_step(dout, q, kv, out, lse, block, scale, dq, kernel)
            dkvs[source][0, block.kv_rows].add_(dk)
            dkvs[source][1, block.kv_rows].add_(dv)
        dqs.append(dq.to(q.dtype))
    return dqs, [dkv.to(q.dtype) for dkv in dkvs]


def _seconds(fn: Callable[[], object], device: str) -> float:
    """One timed call: CUDA events on a GPU, ``time.perf_counter`` on CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def _median_seconds(
    fns: Sequence[Callable[[], object]], device: str, iters: int, warmup: int
) -> List[float]:
    """Median seconds per call of each of ``fns``, run interleaved (one of each per round) so
    that load from other processes on a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples = [[_seconds(fn, device) for fn in fns] for _ in range(iters)]
    return [statistics.median(column) for column in zip(*samples)]


def _machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in lscpu.splitlines() if "Model name" in l)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} torch threads"


def run(args: argparse.Namespace) -> Dict[str, object]:
    check_zigzag_length(args.seq_len, args.ring_size)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    s, b, h, d, ring_size = args.seq_len, args.batch, args.heads, args.head_dim, args.ring_size
    scale = d ** -0.5
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (
        torch.randn(s, b, h, d, generator=gen, device=device, dtype=dtype) for _ in range(4)
    )
    shards = [  # (q [s/R, b, h, d], kv [2, s/R, b, h, d]) per rank, as the ring stacks k/v
        (zigzag_shard(q, r, ring_size), zigzag_shard(torch.stack((k, v)), r, ring_size, dim=1))
        for r in range(ring_size)
    ]
    douts = [zigzag_shard(dout, r, ring_size) for r in range(ring_size)]
    kernel = select_kernel(q, args.kernel)  # the same kernel on both sides
    rows: List[Dict[str, object]] = []
    for causal in MASKS[args.mask]:
        forward_flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)

        def mono_fwd():
            return block_attention_forward(q, k, v, causal, scale, kernel)

        def mono_fwd_bwd():
            out, lse = mono_fwd()
            return block_attention_backward(dout, q, k, v, out, lse, causal, scale, kernel)

        def ring_fwd():
            return _ring_forward_all_ranks(shards, causal, scale, kernel)

        def ring_fwd_bwd():
            return _ring_backward_all_ranks(shards, douts, ring_fwd(), causal, scale, kernel)

        # the simulated ring must compute the same attention as the monolithic call
        ring_out = zigzag_unshard([out for out, _ in ring_fwd()])
        out_diff = (ring_out.float() - mono_fwd()[0].float()).abs().max().item()
        for pass_name, flops, mono, ring in (
            ("fwd", forward_flops, mono_fwd, ring_fwd),
            ("fwd+bwd", 3.5 * forward_flops, mono_fwd_bwd, ring_fwd_bwd),
        ):
            mono_s, ring_s = _median_seconds((mono, ring), args.device, args.iters, args.warmup)
            rows.append({
                "causal": causal, "pass": pass_name, "monolithic_ms": mono_s * 1e3,
                "ring_ms": ring_s * 1e3, "monolithic_tflops": flops / mono_s / 1e12,
                "ring_tflops": flops / ring_s / 1e12, "efficiency": mono_s / ring_s,
                "out_max_abs_diff": out_diff,
            })
    return dict(
        machine=_machine(args.device), torch=torch.__version__, dtype=args.dtype,
        device=args.device, kernel=kernel, mask=args.mask, seq_len=s, ring_size=ring_size,
        heads=h, head_dim=d, batch=b, shard_len=s // ring_size, iters=args.iters,
        warmup=args.warmup, results=rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--ring-size", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--kernel", choices=KERNEL_CHOICES, default="auto",
                        help="block kernel for both sides (auto: flash_attn where it runs)")
    parser.add_argument("--mask", choices=sorted(MASKS), default="both",
                        help="causal, full (no mask) or both, each timed fwd and fwd+bwd")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args()
    report = run(args)
    print(f"{report['machine']} | torch {report['torch']} | {report['kernel']} kernel | "
          f"{args.dtype} | s={args.seq_len} "
          f"R={args.ring_size} b={args.batch} h={args.heads} d={args.head_dim} | "
          f"median of {args.iters} interleaved runs after {args.warmup} warm-up")
    print(f"{'mask':8} {'pass':8} {'mono ms':>10} {'ring ms':>10} {'mono TF/s':>10} "
          f"{'ring TF/s':>10} {'ring/mono':>9} {'max |out diff|':>14}")
    for row in report["results"]:
        print(f"{'causal' if row['causal'] else 'full':8} {row['pass']:8} "
              f"{row['monolithic_ms']:10.2f} {row['ring_ms']:10.2f} "
              f"{row['monolithic_tflops']:10.4f} {row['ring_tflops']:10.4f} "
              f"{row['efficiency']:9.3f} {row['out_max_abs_diff']:14.1e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

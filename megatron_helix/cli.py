"""``megatron-helix``: plan layouts for a cluster, and benchmark this machine.

    megatron-helix plan --preset dense-4l-h4096 --gpus 16 --gpus-per-node 8 --gpu h100
    megatron-helix plan --num-layers 32 --hidden-size 4096 --num-attention-heads 32 \\
        --seq-length 8192 --global-batch-size 512 --gpus 64 --chart plan.png
    megatron-helix bench --validate --json bench.json
    megatron-helix bench --device cuda --json calib.json
    megatron-helix plan --preset dense-4l-h4096 --calibration calib.json

``plan`` lists every legal layout (TP x PP x DP x CP, helix m x n with each score strategy,
ring, layer-wise) with predicted training tokens/s, TPOT (the seeds' per-token share of a
forward pass, and decode latency per token), memory per GPU and whether it fits, best first.
GPU rates are datasheet-derived assumptions unless ``--calibration`` gives a measured file.
``bench`` measures this machine (compute rates, gloo links) and, with ``--validate``, runs the
4-rank CPU validation of the cost model; ``bench --device cuda`` measures one GPU's compute
(links stay assumed) into a calibration ``plan --calibration`` takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

from megatron_helix.model_args import add_model_shape_args, model_shape_kwargs
from megatron_helix.perf.calibration import GPU_SPECS, Calibration, gpu_calibration
from megatron_helix.perf.memory import DTYPE_BYTES


# Left unset, these keep the preset's values (Megatron-LM's defaults would override them).
_PRESET_KEEPS = dict.fromkeys(("moe_router_topk", "swiglu", "add_bias_linear", "normalization",
                               "untie_embeddings_and_output_weights"))


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    from megatron_helix.perf.planner import PRESETS

    model = add_model_shape_args(parser, "workload (Megatron-LM flag names)",
                                 defaults=_PRESET_KEEPS)
    model.add_argument("--preset", choices=sorted(PRESETS),
                       help="a seed workload; model flags given as well override it")
    for flag in ("--global-batch-size", "--micro-batch-size"):
        model.add_argument(flag, type=int)


def _job(args: argparse.Namespace):
    from megatron_helix.layerwise import ModelShape
    from megatron_helix.perf.cost_model import Job
    from megatron_helix.perf.planner import GPT2_VOCAB, PRESETS

    base = PRESETS[args.preset].job if args.preset else None
    if base is None and not (args.num_layers and args.hidden_size and args.num_attention_heads
                             and args.seq_length):
        raise SystemExit("plan needs --preset, or --num-layers, --hidden-size, "
                         "--num-attention-heads and --seq-length")
    shape = dataclasses.asdict(base.model) if base else dict(
        ffn_hidden_size=4 * args.hidden_size, vocab_size=GPT2_VOCAB,
        untie_embeddings_and_output_weights=True)
    shape.update(model_shape_kwargs(args))
    return Job(
        model=ModelShape(**shape),
        seq_length=args.seq_length or base.seq_length,
        micro_batch=args.micro_batch_size or (base.micro_batch if base else 1),
        global_batch=args.global_batch_size or (base.global_batch if base else 1),
        dtype=args.dtype or (base.dtype if base else "bf16"),
    )


def _plan(args: argparse.Namespace) -> int:
    from megatron_helix.perf.cost_model import Cluster
    from megatron_helix.perf.planner import (
        PRESETS,
        format_table,
        layerwise_cache_verdict,
        plan,
        plot,
        reference_layouts,
    )

    job = _job(args)
    if args.calibration:
        calibration = Calibration.load(args.calibration)
        print(f"calibration: {args.calibration} ({calibration.name})")
    else:
        calibration = gpu_calibration(args.gpu, job.dtype)
        print(f"calibration: assumed rates of --gpu {args.gpu} (no --calibration file)")
    cluster = Cluster(args.gpus, args.gpus_per_node, calibration)
    predictions = plan(job, cluster)
    if not predictions:
        print("no legal layout for this workload on this cluster", file=sys.stderr)
        return 1
    m = job.model
    print(f"PROJECTION from the cost model ({calibration.source}): {calibration.notes}")
    print(f"workload: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads"
          f" ({m.query_groups} KV), ffn {m.ffn_hidden_size}"
          + (f", {m.num_experts} experts top-{m.moe_router_topk}" if m.num_experts else "")
          + f", seq {job.seq_length}, global batch {job.global_batch}, micro-batch "
          f"{job.micro_batch}, {job.dtype}; {args.gpus} GPUs, {args.gpus_per_node} per node")
    print("TPOT* = a forward pass of the global batch / its tokens (the seeds' definition); "
          "decode = one new token per sequence against a full KV cache (helix: in the mode "
          "--helix-decode auto takes, kv-parallel or slices)\n")
    limit = args.top or None
    print(format_table(predictions, limit))
    if limit and len(predictions) > limit:
        print(f"... {len(predictions) - limit} more (--top 0 lists all {len(predictions)})")
    references = dict(reference_layouts(m, args.gpus))
    if args.preset:
        references[f"seed proposal ({PRESETS[args.preset].seed})"] = PRESETS[args.preset].proposed
    print("\nreference layouts:")
    by_layout = {p.layout: (i, p) for i, p in enumerate(predictions, start=1)}
    for name, layout in references.items():
        place = by_layout.get(layout)
        if place is None:
            why = "; ".join(layout.errors(m, job.seq_length, job.global_batch, job.micro_batch))
            print(f"  {name}: {layout.label} is not legal here: {why}")
            continue
        i, p = place
        print(f"  {name}: {layout.label} #{i}, {p.tokens_per_s:,.0f} tokens/s, "
              f"{p.memory.total / 1e9:.1f} GB/GPU{'' if p.fits else ' (does NOT fit)'}")
    print(f"\nlayer-wise cache planner: {layerwise_cache_verdict(m, args.gpus)}")
    if args.chart:
        gpu = calibration.name if args.calibration else args.gpu.upper()
        plot(predictions, args.chart, f"{args.preset or 'workload'} on {args.gpus} x {gpu}",
             highlight=list(references.values()))
        print(f"chart: {args.chart}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([_prediction_json(p) for p in predictions], f, indent=1)
    return 0


def _prediction_json(p) -> dict:
    return {"layout": p.layout.label, "sizes": dataclasses.asdict(p.layout),
            "tokens_per_s": p.tokens_per_s, "step_s": p.step_s, "seed_tpot_s": p.seed_tpot_s,
            "decode_tpot_s": p.decode_tpot_s, "memory": dataclasses.asdict(p.memory),
            "memory_total": p.memory.total, "fits": p.fits, "bubble": p.bubble}


def _bench(args: argparse.Namespace) -> int:
    from megatron_helix.perf import bench

    if args.validate and (args.device != "cpu" or args.quick):
        raise SystemExit("--validate runs the CPU validation: it needs --device cpu, no --quick")
    if args.calibration:
        calibration = Calibration.load(args.calibration)
        print(f"calibration loaded from {args.calibration}")
    elif args.device == "cpu" and not args.quick:
        print(f"calibrating this machine on {args.world_size} gloo ranks ...", flush=True)
        calibration = bench.calibrate(args.world_size)
    else:
        import torch

        from megatron_helix.perf.device_calibration import measure_device

        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device here")
        print(f"measuring {args.device}{' (quick)' if args.quick else ''} ...", flush=True)
        calibration = measure_device(args.device, quick=args.quick)
    print(f"source: {calibration.source}")
    print(f"{calibration.name}: parallel capacity {calibration.parallel_capacity:.2f}, "
          f"layer overhead {calibration.layer_overhead_s * 1e6:.0f} us/pass, element-wise "
          f"{calibration.elementwise_bytes_per_s / 1e9:.1f} GB/s")
    _print_compute(calibration)
    for group, ops in calibration.links.items():
        sync = ", ".join(f"{extra * 1e3:.2f} ms after {compute * 1e3:.1f} ms compute"
                         for compute, extra in next(iter(ops.values())).sync)
        print(f"  {group} (sync per call: {sync or 'none'}): " + ", ".join(
            f"{op} {l.alpha * 1e6:.0f} us/step + {l.beta / 1e9:.2f} GB/s" for op, l in ops.items()))
    report = {"calibration": calibration.to_json()}
    if args.validate:
        rows = bench.validate(calibration, rounds=args.rounds, log=lambda s: print(s, flush=True))
        report["validation"] = _print_validation(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"written: {args.json}")
    return 0


def _print_compute(calibration: Calibration) -> None:
    """The measured GEMM and attention tables in brief."""
    if calibration.gemm_table:
        rates = sorted(r.flops_per_s for r in calibration.gemm_table)
        print(f"  GEMM ({calibration.dtype}, {len(rates)} shapes): {rates[0] / 1e12:.3g}-"
              f"{rates[-1] / 1e12:.3g} TFLOP/s, median {rates[len(rates) // 2] / 1e12:.3g}")
    for kernel, table in calibration.attention_tables.items():
        largest = max(table, key=lambda r: r.shape[0] * r.shape[1] ** 2 * r.shape[2])
        print(f"  attention {kernel} at {largest.shape}: forward {largest.forward / 1e12:.3g}, "
              f"backward {largest.backward / 1e12:.3g} TFLOP/s")


def _print_validation(rows) -> dict:
    from megatron_helix.perf.bench import kendall_tau, ranking, validation_argv

    print(f"\nvalidation (iter_ms: median of rounds of the median after warm-up; "
          f"model flags: {' '.join(validation_argv())})")
    print(f"{'layout':<26} {'predicted ms':>12} {'measured ms':>12} {'error':>7} "
          f"{'rounds (ms)':>20}")
    for row in rows:
        rounds = " ".join(f"{r:.0f}" for r in row.round_ms)
        print(f"{row.layout:<26} {row.predicted_ms:>12.0f} {row.measured_ms:>12.0f} "
              f"{row.error:>+7.0%} {rounds:>20}")
    measured = ranking(rows, lambda r: r.measured_ms)
    predicted = ranking(rows, lambda r: r.predicted_ms)
    tau = kendall_tau(measured, predicted)
    print(f"measured order:  {' < '.join(measured)}")
    print(f"predicted order: {' < '.join(predicted)}")
    print(f"Kendall tau {tau:+.2f}; worst error {max(abs(r.error) for r in rows):.0%}")
    return {"rows": [dict(dataclasses.asdict(r), measured_ms=r.measured_ms, error=r.error,
                          round_ms=r.round_ms) for r in rows],
            "measured_order": measured, "predicted_order": predicted, "kendall_tau": tau}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-helix", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="rank every legal layout of a cluster")
    _add_model_flags(plan)
    cluster = plan.add_argument_group("cluster")
    cluster.add_argument("--gpus", type=int, default=16)
    cluster.add_argument("--gpus-per-node", type=int, default=8)
    cluster.add_argument("--gpu", choices=sorted(GPU_SPECS), default="h100")
    cluster.add_argument("--dtype", choices=sorted(DTYPE_BYTES),
                         help="default: the preset's, else bf16")
    cluster.add_argument("--calibration", help="a calibration JSON to use instead of the "
                         "datasheet-derived GPU assumptions")
    out = plan.add_argument_group("output")
    out.add_argument("--top", type=int, default=20, help="rows to print (0: all)")
    out.add_argument("--chart", help="write a PNG chart here")
    out.add_argument("--json", help="write every prediction here")
    plan.set_defaults(func=_plan)

    bench = commands.add_parser("bench", help="measure this machine; --validate the cost model")
    bench.add_argument("--validate", action="store_true",
                       help="run the 4-rank CPU validation (a few minutes)")
    bench.add_argument("--rounds", type=int, default=3, help="validation rounds (interleaved)")
    bench.add_argument("--world-size", type=int, default=4)
    bench.add_argument("--device", default="cpu",
                       help="cpu (default: this machine, gloo links on --world-size ranks) or a "
                            "torch device such as cuda / cuda:1: its compute, links assumed")
    bench.add_argument("--quick", action="store_true",
                       help="every part once on tiny shapes, no link measurement: a rehearsal "
                            "of the code path, not a calibration")
    bench.add_argument("--calibration", help="reuse this calibration JSON instead of measuring")
    bench.add_argument("--json", help="write calibration (and validation) here")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""Every legal layout of a cluster for a workload, predicted and ranked; the seed workloads.

``plan`` predicts each ``layouts.candidate_layouts`` entry with the cost model and ranks them
(fitting layouts first, then by training tokens/s). ``layerwise_cache_verdict`` asks the
layer-wise planner (``megatron_helix.layerwise``) whether any pipeline cut keeps a stage's
weights inside a cache budget, the seeds' "layer fits in L2" claim. ``PRESETS`` are the seed
workloads with their proposed layouts; numbers the seeds leave out are filled in and listed in
``Preset.assumed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_helix.layerwise import (
    LayerwisePlanError,
    ModelShape,
    Workload,
    format_bytes,
    plan_for_world,
)
from megatron_helix.perf.cost_model import Cluster, Job, Prediction, predict, rank
from megatron_helix.perf.layouts import ParallelLayout, candidate_layouts, standard_layout

GPT2_VOCAB = 50257


@dataclass(frozen=True)
class Preset:
    """A seed workload: the job, the seed's proposed layout on 16 GPUs, its claims."""

    seed: str
    job: Job
    proposed: ParallelLayout
    claims: Tuple[str, ...]
    assumed: Tuple[str, ...] = ()


def _dense(layers: int, heads: int, head_dim: int, ffn: int, experts: Optional[int] = None
           ) -> ModelShape:
    return ModelShape(num_layers=layers, hidden_size=heads * head_dim, num_attention_heads=heads,
                      ffn_hidden_size=ffn, num_experts=experts, vocab_size=GPT2_VOCAB,
                      untie_embeddings_and_output_weights=True,
                      add_bias_linear=experts is None)


_COMMON_ASSUMPTIONS = ("vocabulary 50257 (GPT-2, as seed 003)", "micro-batch 1",
                       "untied embeddings", "sequence parallelism with TP")

PRESETS: Dict[str, Preset] = {
    "dense-4l-h4096": Preset(
        "000 / 002 (4-layer dense)",
        Job(_dense(4, 32, 128, 16384), seq_length=10000, micro_batch=1, global_batch=128,
            dtype="fp16"),
        ParallelLayout(tp=16, helix_m=4, sequence_parallel=True),
        ("helix 4x4 +31.7% tokens/s over TP=8 x PP=2 (1.20M -> 1.58M)",
         "TPOT 0.35 -> 0.22 ms", "50% less parameter memory than TP=8 x PP=2"),
        _COMMON_ASSUMPTIONS,
    ),
    "dense-2l-h8192": Preset(
        "001 (2-layer dense, 16 heads x 512)",
        Job(_dense(2, 16, 512, 32768), seq_length=10000, micro_batch=1, global_batch=1024,
            dtype="fp16"),
        ParallelLayout(tp=16, helix_m=4, sequence_parallel=True),
        ("helix 4x4 +31.7% tokens/s over TP=8 x PP=2 (1.20M -> 1.58M)",),
        _COMMON_ASSUMPTIONS,
    ),
    "moe-4l": Preset(
        "002 (4-layer MoE, 8 experts)",
        Job(_dense(4, 16, 512, 32768, experts=8), seq_length=10000, micro_batch=1,
            global_batch=1024, dtype="fp16"),
        ParallelLayout(tp=16, helix_m=4, sequence_parallel=True),
        ("helix 4x4 +35.3% tokens/s over TP=8 x PP=2 (850K -> 1.15M)",
         "TPOT 0.45 -> 0.30 ms"),
        _COMMON_ASSUMPTIONS + ("sequence length 10000 (seed 002 gives none)", "top-2 routing",
                               "experts split by TP (expert tensor parallel = TP)"),
    ),
    "dense-16l-layerwise": Preset(
        "003 (16-layer dense, layer-wise)",
        Job(_dense(16, 32, 128, 16384), seq_length=10000, micro_batch=1, global_batch=128,
            dtype="fp16"),
        ParallelLayout(pp=16, layerwise=True),
        ("layer-wise 16 stages +20% tokens/s over TP=8 x PP=2 (12,800 -> 15,360)",
         "each 268 MB layer fits the 50 MB L2"),
        _COMMON_ASSUMPTIONS,
    ),
    "dense-16l-seq100k": Preset(
        "004 (16-layer dense, sequence 100k, ring)",
        Job(_dense(16, 32, 128, 16384), seq_length=100000, micro_batch=1, global_batch=128,
            dtype="bf16"),
        ParallelLayout(cp=16),
        ("ring R=16 +20.8% tokens/s over TP=8 x PP=2 (1.20M -> 1.45M)",
         "~5 GB per GPU for ring vs ~78 GB for TP=8 x PP=2"),
        _COMMON_ASSUMPTIONS,
    ),
}


def plan(job: Job, cluster: Cluster) -> List[Prediction]:
    """Every legal layout of the cluster, predicted, best first."""
    layouts = candidate_layouts(job.model, cluster.world_size, job.seq_length,
                                job.global_batch, job.micro_batch)
    return rank([predict(job, layout, cluster) for layout in layouts])


def reference_layouts(model: ModelShape, world_size: int) -> Dict[str, ParallelLayout]:
    """The comparisons every published number needs (DESIGN.md): TP x PP, TP, CP."""
    half = max(1, world_size // 2)
    return {
        f"TP={half} x PP=2": standard_layout(model, tp=half, pp=2),
        f"TP={world_size}": standard_layout(model, tp=world_size),
        f"CP (ring R={world_size})": standard_layout(model, cp=world_size),
    }


def layerwise_cache_verdict(model: ModelShape, world_size: int, budget: str = "h100-l2") -> str:
    """Whether the layer-wise planner finds a cut whose stages' weights fit ``budget``."""
    workload = Workload("weights", micro_batch_size=1, seq_length=1)
    try:
        found = plan_for_world(model, workload, world_size, budget)
    except LayerwisePlanError as error:
        return (f"no layer-wise cut of {world_size} devices fits {budget}: a stage needs "
                f"{format_bytes(error.needed_budget)}")
    return f"layer-wise fits {budget}: {found.pipeline_layout}"


# ------------------------------------------------------------------------------ output


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f}"


def format_table(predictions: Sequence[Prediction], limit: Optional[int] = None) -> str:
    """One row per layout: tokens/s, step, seed TPOT, decode TPOT, memory per GPU, fits."""
    header = (f"{'#':>3} {'layout':<40} {'tokens/s':>11} {'step s':>8} {'TPOT* us':>9} "
              f"{'decode ms':>9} {'GB/GPU':>7} {'fits':>4} {'bubble':>6}")
    lines = [header]
    for i, p in enumerate(predictions[:limit], start=1):
        decode = f"{p.decode_tpot_s * 1e3:9.2f}" if p.decode_tpot_s is not None else f"{'n/a':>9}"
        lines.append(
            f"{i:>3} {p.layout.label:<40} {p.tokens_per_s:>11,.0f} {p.step_s:>8.2f} "
            f"{p.seed_tpot_s * 1e6:>9.3f} {decode} {_gb(p.memory.total):>7} "
            f"{'yes' if p.fits else 'NO':>4} {p.bubble:>6.0%}")
    return "\n".join(lines)


def plot(predictions: Sequence[Prediction], path: str, title: str,
         highlight: Sequence[ParallelLayout] = (), limit: int = 25) -> None:
    """Bar chart of predicted tokens/s for the best ``limit`` layouts and every ``highlight``
    one (orange: the reference layouts; hatched gray: does not fit), with memory per GPU on a
    second axis, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = set(highlight)
    shown = [p for i, p in enumerate(predictions) if i < limit or p.layout in wanted]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(shown) + 3), 6))
    bars = ax.bar(range(len(shown)), [p.tokens_per_s for p in shown], color="tab:blue")
    for bar, p in zip(bars, shown):
        if p.layout in wanted:
            bar.set_color("tab:orange")
        if not p.fits:
            bar.set_hatch("//")
            bar.set_color("lightgray")
    ax.set_ylabel("predicted training tokens/s (orange: reference layouts)")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([p.layout.label for p in shown], rotation=75, ha="right", fontsize=7)
    memory = ax.twinx()
    memory.plot(range(len(shown)), [p.memory.total / 1e9 for p in shown], "o", color="tab:red")
    memory.set_ylabel("GB per GPU (red dots); hatched gray bars do not fit")
    ax.set_title(title + " (PROJECTION: cost model, assumed GPU rates)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

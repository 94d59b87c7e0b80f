"""Predicted step time, throughput, TPOT and memory of a layout: ``work`` priced by a
``Calibration`` on a ``Cluster``.

Per pass of one layer on one rank: compute (GEMMs from the GEMM table or roofline, flash
attention from its table or roofline, element-wise bytes at the element-wise rate, a fixed
framework overhead per layer call) plus communication (alpha-beta per collective on the link
its group uses). Communication the implementation posts asynchronously beside compute (the
ring's k/v passing) hides behind the attention compute where the device overlaps them
(``Calibration.overlap``); everything else is on the critical path.

Placement follows Megatron's rank order (tensor fastest, then context, data, pipeline): a
group of ``size`` ranks with stride ``stride`` spans ``size * stride`` consecutive ranks and
crosses nodes when that exceeds the ranks per node. Helix's slice group is the first ``m``
ranks of a TP group.

Schedule: Megatron's 1F1B with ``M`` micro-batches on ``p`` stages takes ``(M + p - 1)`` times
the slowest stage's forward + backward, a bubble of ``(p - 1) / (M + p - 1)``. On a CPU whose
cores all ranks share, a step also takes at least the whole job's compute spread over the
machine's ``parallel_capacity`` plus the communication, whichever bound is larger.

Metrics (``docs/PERFORMANCE.md``): training tokens/s = global batch x sequence / step time;
the seeds' TPOT = a forward pass of the global batch divided by its tokens; decode TPOT = one
decode step (one new token per sequence of the batch, KV cache of the full sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_helix.layerwise import ModelShape
from megatron_helix.layerwise.problems import below_one, raise_problems
from megatron_helix.perf.calibration import Calibration
from megatron_helix.perf.comm_formulas import (
    FP32_BYTES,
    FP64_BYTES,
    all_reduce_sent,
    data_parallel_bytes,
)
from megatron_helix.perf.layouts import ParallelLayout
from megatron_helix.perf.memory import (
    DTYPE_BYTES,
    Kernels,
    MemoryBreakdown,
    Precision,
    stage_layers,
    stage_parameters,
    training_memory,
)
from megatron_helix.perf.work import (
    CommOp,
    LayerShape,
    PassWork,
    decode_layer_work,
    embedding_work,
    layer_work,
    optimizer_bytes,
    output_work,
    pipeline_comms,
)


@dataclass(frozen=True)
class Job:
    """A training workload: model, sequence, batch sizes (Megatron's names), dtype, and
    whether Adam's state is sharded over data x context parallel ranks (Megatron's
    ``--use-distributed-optimizer``; the gradient all-reduce becomes a reduce-scatter plus a
    parameter all-gather, the same bytes)."""

    model: ModelShape
    seq_length: int
    micro_batch: int
    global_batch: int
    dtype: str = "bf16"
    distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        problems = below_one(self, ("seq_length", "micro_batch", "global_batch"))
        if self.dtype not in DTYPE_BYTES:
            problems.append(f"dtype {self.dtype!r} not in {tuple(DTYPE_BYTES)}")
        raise_problems("job", problems)

    @property
    def precision(self) -> Precision:
        return Precision.for_dtype(self.dtype)

    def micro_batches(self, layout: ParallelLayout) -> int:
        return self.global_batch // (self.micro_batch * layout.dp)


@dataclass(frozen=True)
class Cluster:
    """``world_size`` ranks, ``ranks_per_node`` per node, all of one calibrated kind."""

    world_size: int
    ranks_per_node: int
    calibration: Calibration

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.ranks_per_node < 1:
            raise ValueError(f"cluster needs >= 1 ranks and ranks per node, got "
                             f"{self.world_size}, {self.ranks_per_node}")


@dataclass(frozen=True)
class Prediction:
    """What the cost model predicts for one layout (seconds, bytes)."""

    layout: ParallelLayout
    step_s: float
    compute_s: float
    comm_s: float
    bubble: float
    tokens_per_s: float
    seed_tpot_s: float
    decode_tpot_s: Optional[float]
    memory: MemoryBreakdown
    fits: bool


def _group_placement(layout: ParallelLayout, group: str) -> Tuple[int, int]:
    """``(size, consecutive ranks spanned)`` of a group in Megatron's rank order."""
    tp, cp, dp = layout.tp, layout.cp, layout.dp
    return {
        "tp": (tp, tp),
        "helix_slice": (layout.helix_m, layout.helix_m),
        "cp": (cp, tp * cp),
        "dp_cp": (dp * cp, tp * cp * dp),
        "pp": (2, 2 * tp * cp * dp),
        "world": (layout.world_size, layout.world_size),
    }[group]


class _Pricer:
    """Prices ``PassWork`` for one layout on one cluster."""

    def __init__(self, cluster: Cluster, layout: ParallelLayout, element_bytes: int):
        self.cal, self.cluster, self.layout = cluster.calibration, cluster, layout
        self.element_bytes = element_bytes

    def comm(self, op: CommOp, compute_between_calls: float = 0.0) -> float:
        size, span = _group_placement(self.layout, op.group)
        link = self.cal.link(op.collective, size, span > self.cluster.ranks_per_node)
        return link.seconds(op.sent, op.steps, op.calls, compute_between_calls)

    def compute(self, work: PassWork) -> Tuple[float, float]:
        """``(seconds outside attention, seconds of attention kernels)``."""
        gemms = sum(self.cal.gemm_seconds(m, n, k, self.element_bytes) for m, n, k in work.gemms)
        elementwise = self.cal.elementwise_seconds(work.elementwise_bytes)
        attention = sum(self.cal.attention_seconds(a.kernel, a.flops, a.shape, a.bytes, a.backward)
                        for a in work.attention)
        return gemms + elementwise, attention

    def price(self, work: PassWork, layer_calls: int = 0) -> Tuple[float, float]:
        """``(compute seconds, communication seconds on the critical path)`` of a pass of
        ``layer_calls`` layer-sized module calls."""
        other, attention = self.compute(work)
        compute = other + attention + layer_calls * self.cal.layer_overhead_s
        between = compute / max(1, sum(op.calls for op in work.comms))
        blocking = sum(self.comm(op, between) for op in work.comms if not op.overlapped)
        hidden = sum(self.comm(op, between) for op in work.comms if op.overlapped)
        if self.cal.overlap:
            return compute, blocking + max(0.0, hidden - attention)
        return compute, blocking + hidden


def _stage_pass(x: LayerShape, stage: int, backward: bool) -> PassWork:
    layers = stage_layers(x.model, x.layout, stage)
    work = PassWork()
    for _ in range(layers):
        work += layer_work(x, backward)
    if stage == 0:
        work += embedding_work(x, backward)
    if stage == x.layout.pp - 1:
        work += output_work(x, backward)
    work.comms += pipeline_comms(x, stage, backward)
    return work


def _step_comms(layout: ParallelLayout, params: int) -> List[CommOp]:
    """Once per step: the gradient all-reduce over data x context parallel replicas (fp32
    ``main_grad``) with Megatron's token count, and the reported loss over all ranks."""
    world, replicas = layout.world_size, layout.dp * layout.cp
    ops = []
    if world > 1:
        ops.append(CommOp("all_reduce", "world", all_reduce_sent(2 * FP64_BYTES, world),
                          steps=2 * (world - 1)))
    if replicas > 1:
        grads = data_parallel_bytes(params * FP32_BYTES, replicas)
        ops.append(CommOp("all_reduce", "dp_cp", grads + all_reduce_sent(FP32_BYTES, replicas),
                          calls=2, steps=2 * (replicas - 1)))
    return ops


def _combine(stages: List[Tuple[float, float]], micro: int, layout: ParallelLayout,
             cal: Calibration, world: int) -> Tuple[float, float, float]:
    """Step seconds (and its compute / communication parts) of 1F1B over per-stage
    ``(compute, comm)`` per micro-batch."""
    p = layout.pp
    slowest = max(c + k for c, k in stages)
    pipeline = (micro + p - 1) * slowest
    compute = micro * max(c for c, _ in stages)
    comm = micro * max(k for _, k in stages)
    if cal.parallel_capacity:  # ranks share cores: all compute spread over them, plus comm
        ranks_per_stage = world // p
        spread = micro * ranks_per_stage * sum(c for c, _ in stages) / cal.parallel_capacity
        return max(pipeline, spread + comm), spread, comm
    return pipeline, compute, comm


def predict(job: Job, layout: ParallelLayout, cluster: Cluster,
            kernels: Kernels = Kernels()) -> Prediction:
    """Predicted training step, throughput, TPOT and memory of ``layout`` for ``job``."""
    cal = cluster.calibration
    e = job.precision.activation_bytes
    x = LayerShape(job.model, layout, job.micro_batch, job.seq_length, e, kernels)
    pricer = _Pricer(cluster, layout, e)
    micro = job.micro_batches(layout)
    per_stage, forward_only = [], []
    for stage in range(layout.pp):
        calls = stage_layers(job.model, layout, stage) + 1  # + embedding / output / loss
        fc, fk = pricer.price(_stage_pass(x, stage, backward=False), calls)
        bc, bk = pricer.price(_stage_pass(x, stage, backward=True), calls)
        per_stage.append((fc + bc, fk + bk))
        forward_only.append((fc, fk))
    step, compute, comm = _combine(per_stage, micro, layout, cal, cluster.world_size)
    forward, _, _ = _combine(forward_only, micro, layout, cal, cluster.world_size)

    params = max(stage_parameters(job.model, layout, s) for s in range(layout.pp))
    updated = params // (layout.dp * layout.cp) if job.distributed_optimizer else params
    update = cal.elementwise_seconds(
        optimizer_bytes(updated, job.precision.param_bytes, mixed_precision=job.dtype != "fp32"))
    if cal.parallel_capacity:
        update *= cluster.world_size / cal.parallel_capacity
    step += update + sum(pricer.comm(op) for op in _step_comms(layout, params))

    memory = training_memory(job.model, layout, job.micro_batch, job.seq_length, micro,
                             job.precision, distributed_optimizer=job.distributed_optimizer,
                             kernels=kernels)
    tokens = job.global_batch * job.seq_length
    return Prediction(
        layout=layout, step_s=step, compute_s=compute, comm_s=comm,
        bubble=(layout.pp - 1) / (micro + layout.pp - 1),
        tokens_per_s=tokens / step, seed_tpot_s=forward / tokens,
        decode_tpot_s=_decode_seconds(job, layout, pricer, kernels),
        memory=memory, fits=not cal.memory_bytes or memory.total <= cal.memory_bytes,
    )


def _decode_seconds(job: Job, layout: ParallelLayout, pricer: _Pricer,
                    kernels: Kernels) -> Optional[float]:
    """One decode step of the global batch through every stage in turn (a token's latency);
    None under a ring (the plugin's ring attention is a training / prefill kernel)."""
    if layout.cp > 1:
        return None
    x = LayerShape(job.model, layout, job.global_batch // layout.dp, job.seq_length,
                   job.precision.activation_bytes, kernels)
    layer = decode_layer_work(x)
    total = 0.0
    for stage in range(layout.pp):
        layers = stage_layers(job.model, layout, stage)
        compute, comm = pricer.price(layer, layer_calls=1)
        total += layers * (compute + comm)
    hop = CommOp("p2p", "pp", x.micro_batch * job.model.hidden_size * x.element_bytes)
    return total + (layout.pp - 1) * pricer.comm(hop)


def rank(predictions: List[Prediction]) -> List[Prediction]:
    """Best first: layouts that fit memory before those that do not, then by tokens/s."""
    return sorted(predictions, key=lambda p: (not p.fits, -p.tokens_per_s))

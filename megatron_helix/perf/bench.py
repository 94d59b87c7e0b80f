"""Measured benchmarks: calibrate this CPU, and validate the cost model on 4-rank CPU runs.

``calibrate`` measures the compute rates (``cpu_calibration``), the gloo links
(``collective_bench`` under ``torchrun``) and the parallel capacity (``measure_capacity``).
``validate`` trains the validation model under each layout with the plugin's trainer
(``torchrun``, one thread per rank), takes the median ``iter_ms`` after the warm-up
iterations, and sets it beside the cost model's prediction from the calibration. Runs of
all layouts are interleaved over ``rounds`` and each layout's measurement is the median over
rounds, so a burst of foreign load hits one sample, not one layout. The machine may be
shared: every run waits for it to be idle, measures how much CPU other processes took
meanwhile, and is repeated when that exceeds 5% (``measure``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_helix.layerwise import ModelShape
from megatron_helix.perf.calibration import Calibration, Link
from megatron_helix.perf.cost_model import Cluster, Job, predict
from megatron_helix.perf.layouts import ParallelLayout
from megatron_helix.perf.memory import Kernels

WORLD_SIZE = 4
# A model where compute and communication are both measurable on 2 cores, each run < 30 s.
VALIDATION_MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=512,
                        micro_batch_size=1, global_batch_size=4, vocab_size=128)
VALIDATION_ITERS, WARMUP_ITERS = 8, 3
VALIDATION_LAYOUTS: Dict[str, Tuple[List[str], ParallelLayout]] = {
    "TP=4": (["--tensor-model-parallel-size", "4"], ParallelLayout(tp=4)),
    "PP=4": (["--pipeline-model-parallel-size", "4"], ParallelLayout(pp=4)),
    "PP=2 x TP=2": (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"],
                    ParallelLayout(tp=2, pp=2)),
    "helix 2x2 allreduce": (["--helix-m", "2", "--helix-n", "2", "--helix-score-strategy",
                             "allreduce"],
                            ParallelLayout(tp=4, helix_m=2, score_strategy="allreduce")),
    "helix 2x2 redistribute": (["--helix-m", "2", "--helix-n", "2", "--helix-score-strategy",
                                "redistribute"],
                               ParallelLayout(tp=4, helix_m=2, score_strategy="redistribute")),
    "ring R=4": (["--helix-ring-size", "4"], ParallelLayout(cp=4)),
    "ring R=2 x helix 2x1": (["--helix-ring-size", "2", "--helix-m", "2", "--helix-n", "1"],
                             ParallelLayout(tp=2, cp=2, helix_m=2)),
}


def _torchrun(nproc: int) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}"]


def trainer_command(argv: Sequence[str], nproc: int = WORLD_SIZE) -> List[str]:
    """``torchrun`` of the plugin's trainer (``megatron_helix.trainer.main``) with ``argv``."""
    entry = "from megatron_helix.trainer import main; main()"
    return _torchrun(nproc) + ["--no-python", sys.executable, "-c", entry, *argv]


def validation_argv() -> List[str]:
    flags = [f"--{key.replace('_', '-')}" for key in VALIDATION_MODEL]
    values = [str(value) for value in VALIDATION_MODEL.values()]
    return [x for pair in zip(flags, values) for x in pair] + [
        "--train-iters", str(VALIDATION_ITERS)]


def validation_job() -> Job:
    v = VALIDATION_MODEL
    model = ModelShape(num_layers=v["num_layers"], hidden_size=v["hidden_size"],
                       num_attention_heads=v["num_attention_heads"],
                       ffn_hidden_size=4 * v["hidden_size"], vocab_size=v["vocab_size"],
                       untie_embeddings_and_output_weights=True, make_vocab_size_divisible_by=1)
    return Job(model, v["seq_length"], v["micro_batch_size"], v["global_batch_size"], "fp32",
               distributed_optimizer=False)  # as the trainer runs


# ------------------------------------------------------------------ measuring on a shared box


def _machine_busy_seconds() -> float:
    """CPU seconds all cores have been busy since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _busy_fraction(seconds: float = 2.0) -> float:
    before = _machine_busy_seconds()
    time.sleep(seconds)
    return (_machine_busy_seconds() - before) / (seconds * (os.cpu_count() or 1))


def wait_for_quiet(threshold: float = 0.1, timeout_s: float = 300.0) -> None:
    """Wait until under ``threshold`` of the CPU is busy, at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while _busy_fraction() > threshold and time.monotonic() < deadline:
        pass


@dataclass
class Sample:
    """One trainer run: ``iter_ms`` of every iteration and the share of the machine's CPU
    that other processes used meanwhile (``foreign``)."""

    iter_ms: List[float]
    foreign: float

    @property
    def median_ms(self) -> float:
        """Median ``iter_ms`` after the warm-up iterations."""
        return statistics.median(self.iter_ms[WARMUP_ITERS:])


def _run_once(argv: List[str], nproc: int) -> Sample:
    with tempfile.TemporaryDirectory() as out:
        metrics = os.path.join(out, "metrics.jsonl")
        command = trainer_command(validation_argv() + argv + ["--metrics-file", metrics], nproc)
        busy, mine, start = _machine_busy_seconds(), _children_cpu_seconds(), time.monotonic()
        subprocess.run(command, check=True, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
        wall = time.monotonic() - start
        foreign = (_machine_busy_seconds() - busy) - (_children_cpu_seconds() - mine)
        with open(metrics, encoding="utf-8") as f:
            iter_ms = [json.loads(line)["iter_ms"] for line in f]
    return Sample(iter_ms, max(0.0, foreign) / (wall * (os.cpu_count() or 1)))


def measure(argv: List[str], nproc: int = WORLD_SIZE, attempts: int = 3,
            max_foreign: float = 0.05) -> Sample:
    """Train the validation model with ``argv`` once the machine is quiet; runs during which
    other processes took more than ``max_foreign`` of the CPU are repeated (``attempts`` in
    all) and the least disturbed one is kept."""
    samples = []
    for _ in range(attempts):
        wait_for_quiet()
        samples.append(_run_once(argv, nproc))
        if samples[-1].foreign <= max_foreign:
            break
    return min(samples, key=lambda sample: sample.foreign)


# ----------------------------------------------------------------------- calibration


def measure_links(nproc: int = WORLD_SIZE) -> Dict[str, Dict[str, Link]]:
    """Gloo alpha-beta links from ``collective_bench`` on ``nproc`` ranks."""
    wait_for_quiet()
    with tempfile.TemporaryDirectory() as out:
        path = os.path.join(out, "links.json")
        command = _torchrun(nproc) + ["-m", "megatron_helix.perf.collective_bench", "--json", path]
        subprocess.run(command, check=True, capture_output=True, text=True)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    return {group: {op: Link(**link) for op, link in ops.items()} for group, ops in data.items()}


def measure_capacity(world_size: int = WORLD_SIZE, rounds: int = 3) -> float:
    """Ranks' worth of trainer compute the machine delivers with ``world_size`` ranks: the
    validation model on one rank, then data-parallel on ``world_size`` ranks with
    ``world_size`` times the batch (each rank the one-rank work, one gradient all-reduce per
    step): ``world_size * t_one / t_dp``, the median over ``rounds``. Shared caches, memory
    bandwidth and time-slicing more ranks than cores all lower it below the core count."""
    batch = VALIDATION_MODEL["global_batch_size"]
    ratios = []
    for _ in range(rounds):
        one = measure(["--global-batch-size", str(batch)], nproc=1).median_ms
        dp = measure(["--global-batch-size", str(world_size * batch)], nproc=world_size)
        ratios.append(world_size * one / dp.median_ms)
    return statistics.median(ratios)


def calibrate(world_size: int = WORLD_SIZE) -> Calibration:
    """This machine's calibration: kernel rates, gloo links and the trainer's parallel
    capacity, measured now."""
    from megatron_helix.perf.cpu_calibration import measure_cpu

    wait_for_quiet()
    return dataclasses.replace(measure_cpu(), links=measure_links(world_size),
                               parallel_capacity=measure_capacity(world_size))


# ------------------------------------------------------------------------ validation


@dataclass
class ValidationRow:
    layout: str
    command: List[str]
    predicted_ms: float
    samples: List[Sample]  # one per round

    @property
    def round_ms(self) -> List[float]:
        return [sample.median_ms for sample in self.samples]

    @property
    def measured_ms(self) -> float:
        """Median over rounds."""
        return statistics.median(self.round_ms)

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1.0


def validate(calibration: Calibration, rounds: int = 3,
             layouts: Optional[Sequence[str]] = None, log=print) -> List[ValidationRow]:
    """Predict and measure each validation layout (see the module docstring)."""
    job, cluster = validation_job(), Cluster(WORLD_SIZE, WORLD_SIZE, calibration)
    rows = {}
    for name in layouts or VALIDATION_LAYOUTS:
        argv, layout = VALIDATION_LAYOUTS[name]
        predicted = predict(job, layout, cluster, Kernels.local_spec(layout)).step_s * 1e3
        rows[name] = ValidationRow(name, trainer_command(validation_argv() + argv), predicted, [])
    for round_index in range(rounds):
        for name, row in rows.items():
            row.samples.append(measure(VALIDATION_LAYOUTS[name][0]))
            log(f"round {round_index + 1}/{rounds} {name}: {row.round_ms[-1]:.0f} ms "
                f"(other processes used {row.samples[-1].foreign:.0%} of the CPU)")
    return list(rows.values())


def ranking(rows: Sequence[ValidationRow], key) -> List[str]:
    return [row.layout for row in sorted(rows, key=key)]


def kendall_tau(first: Sequence[str], second: Sequence[str]) -> float:
    """Rank agreement of two orderings of the same items: 1 identical, -1 reversed."""
    position = {item: i for i, item in enumerate(second)}
    pairs = [(a, b) for i, a in enumerate(first) for b in first[i + 1:]]
    concordant = sum(1 if position[a] < position[b] else -1 for a, b in pairs)
    return concordant / max(1, len(pairs))

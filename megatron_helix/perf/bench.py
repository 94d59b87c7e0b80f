"""Measured benchmarks: calibrate this CPU, and validate the cost model on 4-rank CPU runs.

``calibrate`` measures the compute rates (``cpu_calibration``) and the gloo links
(``collective_bench`` under ``torchrun``). ``validate`` trains the validation model under each
layout with the plugin's trainer (``torchrun``, one thread per rank), takes the median
``iter_ms`` after the warm-up iterations, and sets it beside the cost model's prediction from
the calibration. Runs of all layouts are interleaved over ``rounds`` and each layout's
measurement is the median over rounds, so a burst of foreign load hits one sample, not one
layout; before every run the bench waits (up to ``quiet_timeout_s``) for the machine to be
idle and records how busy it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
    return Job(model, v["seq_length"], v["micro_batch_size"], v["global_batch_size"], "fp32")


# ----------------------------------------------------------------------- machine state


def _cpu_times() -> Tuple[int, int]:
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields), idle


def busy_fraction(seconds: float = 2.0) -> float:
    """Share of all cores busy over ``seconds`` (from ``/proc/stat``)."""
    total0, idle0 = _cpu_times()
    time.sleep(seconds)
    total1, idle1 = _cpu_times()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(threshold: float = 0.1, timeout_s: float = 300.0) -> float:
    """Wait until under ``threshold`` of the CPU is busy (or ``timeout_s``); the last reading."""
    deadline = time.monotonic() + timeout_s
    busy = busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        busy = busy_fraction()
    return busy


# ----------------------------------------------------------------------- calibration


def measure_links(nproc: int = WORLD_SIZE) -> Dict[str, Dict[str, Link]]:
    """Gloo alpha-beta links from ``collective_bench`` on ``nproc`` ranks."""
    with tempfile.TemporaryDirectory() as out:
        path = os.path.join(out, "links.json")
        command = _torchrun(nproc) + ["-m", "megatron_helix.perf.collective_bench", "--json", path]
        subprocess.run(command, check=True, capture_output=True, text=True)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    return {group: {op: Link(**link) for op, link in ops.items()} for group, ops in data.items()}


def calibrate(world_size: int = WORLD_SIZE) -> Calibration:
    """This machine's calibration: compute rates and gloo links, measured now."""
    from megatron_helix.perf.cpu_calibration import measure_cpu

    return dataclasses.replace(measure_cpu(world_size), links=measure_links(world_size))


# ------------------------------------------------------------------------ validation


@dataclass
class ValidationRow:
    layout: str
    command: List[str]
    predicted_ms: float
    iter_ms: List[List[float]]  # per round, every iteration
    busy_before: List[float]

    @property
    def measured_ms(self) -> float:
        """Median over rounds of each round's median after the warm-up iterations."""
        return statistics.median(statistics.median(r[WARMUP_ITERS:]) for r in self.iter_ms)

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1.0


def _run_layout(argv: List[str]) -> List[float]:
    with tempfile.TemporaryDirectory() as out:
        metrics = os.path.join(out, "metrics.jsonl")
        command = trainer_command(validation_argv() + argv + ["--metrics-file", metrics])
        subprocess.run(command, check=True, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
        with open(metrics, encoding="utf-8") as f:
            return [json.loads(line)["iter_ms"] for line in f]


def validate(calibration: Calibration, rounds: int = 2, quiet_timeout_s: float = 300.0,
             layouts: Optional[Sequence[str]] = None, log=print) -> List[ValidationRow]:
    """Predict and measure each validation layout (see the module docstring)."""
    job, cluster = validation_job(), Cluster(WORLD_SIZE, WORLD_SIZE, calibration)
    rows = {}
    for name in layouts or VALIDATION_LAYOUTS:
        argv, layout = VALIDATION_LAYOUTS[name]
        predicted = predict(job, layout, cluster, Kernels.local_spec(layout)).step_s * 1e3
        command = trainer_command(validation_argv() + argv)
        rows[name] = ValidationRow(name, command, predicted, [], [])
    for round_index in range(rounds):
        for name, row in rows.items():
            row.busy_before.append(wait_for_quiet(timeout_s=quiet_timeout_s))
            row.iter_ms.append(_run_layout(VALIDATION_LAYOUTS[name][0]))
            log(f"round {round_index + 1}/{rounds} {name}: median "
                f"{statistics.median(row.iter_ms[-1][WARMUP_ITERS:]):.0f} ms "
                f"(CPU busy {row.busy_before[-1]:.0%} before)")
    return list(rows.values())


def ranking(rows: Sequence[ValidationRow], key) -> List[str]:
    return [row.layout for row in sorted(rows, key=key)]


def kendall_tau(first: Sequence[str], second: Sequence[str]) -> float:
    """Rank agreement of two orderings of the same items: 1 identical, -1 reversed."""
    position = {item: i for i, item in enumerate(second)}
    pairs = [(a, b) for i, a in enumerate(first) for b in first[i + 1:]]
    concordant = sum(1 if position[a] < position[b] else -1 for a, b in pairs)
    return concordant / max(1, len(pairs))

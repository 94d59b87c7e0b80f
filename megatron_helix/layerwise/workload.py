"""What a pipeline stage runs, and the bytes one of its devices needs for it.

The bytes are priced in ``stage_model`` through ``perf.memory``, the one memory model (its
activation formulas are checked against measured CPU runs in ``tests/test_memory.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_helix.layerwise.problems import below_one, raise_problems

MODES = ("weights", "decode", "forward", "training")


@dataclass(frozen=True)
class Workload:
    """What a stage runs, which decides what its working set holds.

    ``mode``: ``"weights"`` (weights only: what a "layer fits L2" claim is about), ``"decode"``
    (one token per sequence against a KV cache of ``seq_length``: weights, KV cache, live
    activations), ``"forward"`` (inference over ``micro_batch_size x seq_length`` tokens:
    weights, live activations), ``"training"`` (1F1B forward + backward: weights, gradients and
    optimizer state, saved activations of the micro-batches in flight). ``dtype_bytes``: of
    parameters and activations, 2 for fp16/bf16. ``training_state_bytes_per_param``: 16 for
    an fp32 main gradient, fp32 master weight and two fp32 Adam moments; ``4 + 12 / dp`` with
    the distributed optimizer.
    """

    mode: str
    micro_batch_size: int
    seq_length: int
    dtype_bytes: int = 2
    training_state_bytes_per_param: int = 16

    def __post_init__(self) -> None:
        problems = below_one(self, ("micro_batch_size", "seq_length", "dtype_bytes"))
        if self.training_state_bytes_per_param < 0:
            problems.append("training_state_bytes_per_param must be >= 0")
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {MODES}")
        raise_problems("workload", problems)

    @property
    def tokens(self) -> int:
        """Tokens per step: one per sequence when decoding (or streaming weights), else ``b s``."""
        if self.mode in ("weights", "decode"):
            return self.micro_batch_size
        return self.micro_batch_size * self.seq_length

    @property
    def default_cost(self) -> str:
        """Decode steps are bandwidth-bound (bytes); prefill and training are compute-bound."""
        return "bytes" if self.mode in ("weights", "decode") else "flops"


@dataclass(frozen=True)
class StageWorkingSet:
    """Bytes one device of a stage needs.

    ``state_bytes`` is the KV cache (decode) or gradients + optimizer state (training).
    """

    weight_bytes: int
    state_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.state_bytes + self.activation_bytes

"""Impossible layouts fail fast, on every rank, with the message that says why and what works.

Two layouts, through the plugin's example script under torchrun: a shape error and one only the
world size reveals. Every message is checked at argument level in ``tests/test_arguments.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "8",
        "--seq-length", "32", "--train-iters", "1"]

CASES = {
    "heads % n": (["--num-attention-heads", "6", "--hidden-size", "48",
                   "--helix-m", "1", "--helix-n", "4"], "--helix-n 4 must divide --num-attention-heads 6"),
    "world % (m*n*pp)": (["--helix-m", "2", "--helix-n", "1", "--pipeline-model-parallel-size", "3"],
                         "world size 4 is not divisible"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_invalid_layout_exits_on_every_rank_with_its_message(name, tmp_path):
    flags, message = CASES[name]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "--log-dir", str(tmp_path), "--tee", "3",
         str(ROOT / "examples" / "pretrain_helix_gpt.py"), *BASE, *flags],
        capture_output=True, text=True, timeout=300, env=env,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    for rank in range(4):
        rank_logs = "".join(p.read_text() for p in tmp_path.rglob(f"{rank}/stderr.log"))
        assert message in rank_logs, f"rank {rank} did not report: {message}\n{output[-3000:]}"
    # A rank that waited for the others would wait out the process-group timeout (Megatron-LM's
    # --distributed-timeout-minutes, 10; torch's gloo default, 30): far more than this bound,
    # which leaves room for a busy machine.
    assert elapsed < 240, f"took {elapsed:.0f} s: some rank waited for the others"

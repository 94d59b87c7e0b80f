"""``benchmarks/gpu_checks.sh --cpu-smoke``: the GPU script's every step, rehearsed on the CPU
with tiny sizes, so that it cannot rot between GPU windows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["machine", "ring_s32k_R8", "cuda_tests", "bench", "l2_residency", "ring_s32k_R16",
         "ring_s100k_R8", "ring_s100k_R16"]


def test_cpu_rehearsal_runs_every_step_under_its_cap(tmp_path: Path) -> None:
    out = tmp_path / "gpu_checks"
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), "--cpu-smoke", str(out)],
        env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
        timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert len(list(out.iterdir())) <= 4
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["mode"] == "cpu-smoke"
    assert [step["name"] for step in summary["steps"]] == STEPS
    for step in summary["steps"]:
        assert step["status"] == "ok" and step["exit_status"] == 0, step
        assert step["seconds"] <= step["cap_s"], step
        assert isinstance(step["result"], dict), step  # each step's result, inline
    assert summary["machine"] == summary["steps"][0]["result"]
    assert summary["machine"]["gpu"] is None
    assert summary["steps"][2]["result"]["failures"] == 0
    l2 = summary["steps"][4]["result"]
    assert not l2["cuda_graph"] and "not measurable" in l2["note"]
    for ring in summary["steps"][5:]:
        assert all(row["causal"] for row in ring["result"]["results"])
    assert "ring_s32k_R8" in (out / "gpu_checks.log").read_text(encoding="utf-8")

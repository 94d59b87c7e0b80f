"""``megatron-helix bench --device``: one device's compute measured into a calibration that
``megatron-helix plan --calibration`` takes. On the CPU the quick form (tiny shapes, one
repeat) rehearses the code path the GPU measurement runs; on CUDA the same, where there is
a GPU. No assertion here is about speed."""

from __future__ import annotations

import pytest
import torch

from megatron_helix.perf.calibration import ATTENTION_KERNELS, Calibration


def _check_rates(calibration: Calibration) -> None:
    assert set(calibration.attention_tables) == set(ATTENTION_KERNELS)
    for kernel, rates in calibration.attention_tables.items():
        assert rates, kernel
        assert all(r.forward > 0 and r.backward > 0 for r in rates), kernel
    assert calibration.gemm_table and all(r.flops_per_s > 0 for r in calibration.gemm_table)
    assert calibration.gemm_roofline is None and not calibration.attention_rooflines
    assert calibration.elementwise_bytes_per_s > 0 and calibration.layer_overhead_s > 0
    assert set(calibration.links) == {"nvlink", "infiniband"}
    assert "links assumed" in calibration.source


def test_quick_cpu_bench_is_a_calibration_plan_ranks_with(tmp_path, capsys):
    from megatron_helix.cli import main

    path = str(tmp_path / "calib.json")
    assert main(["bench", "--device", "cpu", "--quick", "--json", path]) == 0
    calibration = Calibration.load(path)
    assert Calibration.from_json(calibration.to_json()) == calibration
    _check_rates(calibration)
    assert calibration.dtype == "fp32" and "rehearsal" in calibration.source
    capsys.readouterr()

    assert main(["plan", "--preset", "dense-4l-h4096", "--gpus", "16", "--calibration", path,
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert f"calibration: {path}" in out
    assert f"PROJECTION from the cost model ({calibration.source})" in out
    assert "\n  1 " in out and "\n  3 " in out


def test_quick_device_calibration_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from megatron_helix.perf.device_calibration import measure_device

    calibration = measure_device("cuda", quick=True)
    _check_rates(calibration)
    assert calibration.dtype == "bf16" and calibration.memory_bytes > 0
    assert torch.cuda.get_device_name() in calibration.source

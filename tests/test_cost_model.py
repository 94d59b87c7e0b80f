"""The cost model's bookkeeping, without timing anything.

The work it prices must move exactly the bytes of the formulas that ``test_comm_accounting``
checks against real traffic; layouts must be legal and distinct; the schedule's bubble is
1F1B's; calibrations survive JSON; ``megatron-helix plan`` runs in seconds and labels its
numbers as projections. No assertion here is about speed.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from megatron_helix.attention.strategy import SliceGroupShape
from megatron_helix.layerwise import ModelShape
from megatron_helix.perf import comm_formulas as f
from megatron_helix.perf.calibration import Calibration, gpu_calibration
from megatron_helix.perf.cost_model import Cluster, Job, predict
from megatron_helix.perf.layouts import ParallelLayout, candidate_layouts
from megatron_helix.perf.memory import Kernels
from megatron_helix.perf.work import LayerShape, decode_layer_work, layer_work

MODEL = ModelShape(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=4,
                   ffn_hidden_size=2048, vocab_size=1000)
B, S, E = 2, 1024, 2


def _sent_by_group(layout: ParallelLayout, kernels: Kernels = Kernels()) -> dict:
    shape = LayerShape(MODEL, layout, B, S, E, kernels)
    sent = defaultdict(int)
    for backward in (False, True):
        for op in layer_work(shape, backward).comms:
            sent[op.group] += op.sent
    return dict(sent)


def _slice_shape(m: int, n: int) -> SliceGroupShape:
    d = MODEL.head_dim
    return SliceGroupShape(m=m, batch=B, seq_q=S, seq_kv=S, heads=8 // n, kv_heads=4 // n,
                           slice_dim=d // m, element_bytes=E)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp_work_moves_the_formula_bytes(sequence_parallel):
    layout = ParallelLayout(tp=4, sequence_parallel=sequence_parallel)
    expected = f.tp_layer_bytes(B * S, 512, 4, E, sequence_parallel)
    assert _sent_by_group(layout) == {"tp": expected}


@pytest.mark.parametrize("strategy", ["allreduce", "redistribute"])
def test_helix_work_moves_the_formula_bytes(strategy):
    layout = ParallelLayout(tp=4, helix_m=2, score_strategy=strategy)
    sent = _sent_by_group(layout)
    assert sent["helix_slice"] == f.helix_attention_bytes(_slice_shape(2, 2), strategy)
    assert sent["tp"] == f.tp_layer_bytes(B * S, 512, 4, E, sequence_parallel=False)


@pytest.mark.parametrize("context, mode", [(4, "slices"), (S, "kv-parallel")])
def test_helix_decode_work_moves_the_formula_bytes_of_the_mode_auto_takes(context, mode):
    layout = ParallelLayout(tp=4, helix_m=2)
    shape = LayerShape(MODEL, layout, B, context, E, Kernels.local_spec(layout))
    sent = defaultdict(int)
    for op in decode_layer_work(shape).comms:
        sent[op.group] += op.sent
    slice_group = SliceGroupShape(m=2, batch=B, seq_q=1, seq_kv=context, heads=4, kv_heads=2,
                                  slice_dim=MODEL.head_dim // 2, element_bytes=E)
    assert sent == {"tp": f.tp_layer_bytes(B, 512, 4, E, False, backward=False),
                    "helix_slice": f.helix_decode_bytes(slice_group, mode)}


def test_ring_work_moves_the_formula_bytes():
    sent = _sent_by_group(ParallelLayout(cp=4))
    assert sent == {"cp": f.ring_attention_bytes(4, B * S // 4, 4, 64, E)}
    ring_helix = _sent_by_group(ParallelLayout(tp=2, cp=2, helix_m=2))
    tokens = B * S // 2
    assert ring_helix["cp"] == f.ring_attention_bytes(2, tokens, 2, 64, E)
    assert ring_helix["helix_slice"] == f.helix_ring_exchange_bytes(2, tokens, 8, 4, 32, E)


def test_candidate_layouts_are_legal_distinct_and_complete():
    model = ModelShape(num_layers=16, hidden_size=1024, num_attention_heads=16,
                       num_query_groups=8, ffn_hidden_size=4096, vocab_size=1000)
    layouts = list(candidate_layouts(model, 16, S, global_batch=64, micro_batch=1))
    labels = [layout.label for layout in layouts]
    assert len(labels) == len(set(labels))
    assert all(not layout.errors(model, S, 64, 1) for layout in layouts)
    for wanted in ("TP=8+SP x PP=2", "helix 4x4 allreduce", "helix 4x4 redistribute",
                   "helix 2x8 redistribute", "ring R=16", "PP=4 x DP=4", "layer-wise PP=16",
                   "DP=16"):
        assert wanted in labels, wanted
    assert "TP=16+SP" not in labels, "8 KV groups cannot be split 16 ways by plain TP"


def test_pipeline_bubble_is_1f1b():
    job = Job(MODEL, S, micro_batch=1, global_batch=8)
    prediction = predict(job, ParallelLayout(pp=4), Cluster(4, 8, gpu_calibration("h100")))
    assert prediction.bubble == pytest.approx(3 / (8 + 3))


def test_calibration_round_trips_through_json(tmp_path):
    calibration = gpu_calibration("h200", "bf16")
    path = tmp_path / "calibration.json"
    calibration.save(str(path))
    assert Calibration.load(str(path)) == calibration


def test_plan_cli_prints_labelled_projections(capsys, tmp_path):
    from megatron_helix.cli import main

    assert main(["plan", "--preset", "dense-4l-h4096", "--gpus", "16", "--gpus-per-node", "8",
                 "--gpu", "h100", "--top", "5", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "PROJECTION" in out and "assumed" in out
    assert "helix 4x4" in out and "TP=8+SP x PP=2" in out
    assert (tmp_path / "plan.json").stat().st_size > 0


def test_plan_cli_writes_a_chart(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_helix.cli import main

    chart = tmp_path / "plan.png"
    assert main(["plan", "--preset", "moe-4l", "--top", "1", "--chart", str(chart)]) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

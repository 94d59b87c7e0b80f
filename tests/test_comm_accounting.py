"""Measured communication equals the closed-form formulas, byte for byte.

One spawned 4-rank gloo world runs, under a ``CommCounter``, one forward + backward of a real
Megatron transformer layer per layout (Megatron TP with and without sequence parallelism, helix
2 x 2 with each score strategy, ring R=4, ring R=2 x helix 2 x 1) and one training step of a
4-stage pipeline, and reports per process group what each rank sent and received. These are
byte counts of the algorithms ``comm_counter`` documents, not timings.
"""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed

B, S, HEADS, GROUPS, HEAD_DIM = 2, 64, 8, 4, 16
HIDDEN = HEADS * HEAD_DIM
FP32 = 4


def _layer(spec, tp, cp, sequence_parallel):
    import torch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    model_parallel_cuda_manual_seed(7, inference_rng_tracker=True)
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        tensor_model_parallel_size=tp, context_parallel_size=cp,
        sequence_parallel=sequence_parallel, use_cpu_initialization=True,
        params_dtype=torch.float32, attention_dropout=0.0, hidden_dropout=0.0,
    )
    return build_module(spec, config=config, layer_number=1)


def _count_layer(layer, local_tokens):
    """Forward + backward of one layer on ``[local_tokens, B, HIDDEN]``; the counter."""
    import torch

    from megatron_helix.perf.comm_counter import CommCounter

    x = torch.randn(local_tokens, B, HIDDEN, requires_grad=True)
    with CommCounter() as counter:
        out, _ = layer(x, attention_mask=None)
        out.sum().backward()
    return counter


def _summary(counter):
    groups = {key.group for key in counter.tallies}
    return {g: (counter.bytes_sent(group=g), counter.bytes_received(group=g)) for g in groups}


def _layer_cases(rank):
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_helix import parallel_state as helix_state
    from megatron_helix.specs import get_gpt_layer_helix_spec

    results = {}

    def run(name, m, n, ring, spec, sequence_parallel=False, block=None):
        helix_state.initialize_helix(m, n, ring_size=ring)
        helix_state.helix_manual_seed(7)
        try:
            layer = _layer(spec, m * n, ring, sequence_parallel)
            if block is not None:
                layer.self_attention.core_attention.query_block_size = block
            tokens = S // ring // (m * n if sequence_parallel else 1)
            results[name] = _summary(_count_layer(layer, tokens))
        finally:
            mpu.destroy_model_parallel()
            helix_state.destroy_helix()

    run("tp4", 1, 4, 1, get_gpt_layer_local_spec())
    run("tp4_sp", 1, 4, 1, get_gpt_layer_local_spec(), sequence_parallel=True)
    run("helix_allreduce", 2, 2, 1, get_gpt_layer_helix_spec(score_strategy="allreduce"),
        block=24)
    run("helix_redistribute", 2, 2, 1, get_gpt_layer_helix_spec(score_strategy="redistribute"))
    run("ring4", 1, 1, 4, get_gpt_layer_helix_spec(ring=True))
    run("ring2_helix2x1", 2, 1, 2, get_gpt_layer_helix_spec(ring=True))
    return results


def _pipeline_case(rank):
    from megatron_helix.perf.comm_counter import CommCounter
    from megatron_helix.trainer import build_parser, train

    argv = ["--num-layers", "4", "--hidden-size", str(HIDDEN), "--num-attention-heads",
            str(HEADS), "--seq-length", str(S), "--micro-batch-size", str(B),
            "--global-batch-size", str(3 * B), "--train-iters", "1",
            "--pipeline-model-parallel-size", "4"]
    with CommCounter() as counter:
        train(build_parser().parse_args(argv))
    return {"sent": counter.bytes_sent(p2p=True), "received": counter.bytes_received(p2p=True),
            "pp_group_sent": counter.bytes_sent(group="pp", p2p=True)}


def _restores_bindings() -> bool:
    """Megatron's ``mappings`` bound ``all_gather_into_tensor`` at import: wrapped, then back."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    from megatron_helix.perf.comm_counter import CommCounter

    before = (dist.all_reduce, dist.isend, mappings.dist_all_gather_func)
    with CommCounter():
        wrapped = all(now is not then for now, then in zip(
            (dist.all_reduce, dist.isend, mappings.dist_all_gather_func), before))
    after = (dist.all_reduce, dist.isend, mappings.dist_all_gather_func)
    return wrapped and all(now is then for now, then in zip(after, before))


def _world(rank, world_size):
    from megatron_helix.cpu import enable_cpu_execution

    enable_cpu_execution()
    return {"layers": _layer_cases(rank), "pipeline": _pipeline_case(rank),
            "restored": _restores_bindings()}


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_world, 4)


def _sent(measured, case, group):
    return [rank["layers"][case].get(group, (0, 0))[0] for rank in measured]


def _received(measured, case, group):
    return [rank["layers"][case].get(group, (0, 0))[1] for rank in measured]


def test_megatron_tp_layer(measured):
    from megatron_helix.perf.comm_formulas import tp_layer_bytes

    for case, sp in (("tp4", False), ("tp4_sp", True)):
        expected = tp_layer_bytes(B * S, HIDDEN, 4, FP32, sequence_parallel=sp)
        assert _sent(measured, case, "tp") == [expected] * 4, case
        assert _received(measured, case, "tp") == [expected] * 4, case
        assert set(measured[0]["layers"][case]) == {"tp"}, "TP talks on the TP group only"


@pytest.mark.parametrize("strategy", ["allreduce", "redistribute"])
def test_helix_layer(measured, strategy):
    from megatron_helix.attention.strategy import SliceGroupShape
    from megatron_helix.perf.comm_formulas import helix_attention_bytes, tp_layer_bytes

    case = f"helix_{strategy}"
    m, n = 2, 2
    shape = SliceGroupShape(m=m, batch=B, seq_q=S, seq_kv=S, heads=HEADS // n,
                            kv_heads=GROUPS // n, slice_dim=HEAD_DIM // m, element_bytes=FP32)
    block = 24 if strategy == "allreduce" else 512
    expected_slice = helix_attention_bytes(shape, strategy, causal=True, query_block_size=block)
    assert expected_slice > 0
    assert _sent(measured, case, "helix_slice") == [expected_slice] * 4
    assert _received(measured, case, "helix_slice") == [expected_slice] * 4
    expected_tp = tp_layer_bytes(B * S, HIDDEN, m * n, FP32, sequence_parallel=False)
    assert _sent(measured, case, "tp") == [expected_tp] * 4


def test_ring_layer(measured):
    from megatron_helix.perf.comm_formulas import ring_attention_bytes

    expected = ring_attention_bytes(4, B * S // 4, GROUPS, HEAD_DIM, FP32)
    assert _sent(measured, "ring4", "cp") == [expected] * 4
    assert _received(measured, "ring4", "cp") == [expected] * 4
    assert set(measured[0]["layers"]["ring4"]) == {"cp"}


def test_ring_with_helix_layer(measured):
    from megatron_helix.perf.comm_formulas import (
        helix_ring_exchange_bytes,
        ring_attention_bytes,
        tp_layer_bytes,
    )

    m, ring = 2, 2
    tokens = B * S // ring
    ring_bytes = ring_attention_bytes(ring, tokens, GROUPS // m, HEAD_DIM, FP32)
    exchange = helix_ring_exchange_bytes(m, tokens, HEADS, GROUPS, HEAD_DIM // m, FP32)
    assert _sent(measured, "ring2_helix2x1", "cp") == [ring_bytes] * 4
    assert _sent(measured, "ring2_helix2x1", "helix_slice") == [exchange] * 4
    tp = tp_layer_bytes(tokens, HIDDEN, m, FP32, sequence_parallel=False)
    assert _sent(measured, "ring2_helix2x1", "tp") == [tp] * 4


def test_pipeline_activations(measured):
    from megatron_helix.perf.comm_formulas import pipeline_p2p_bytes

    activation = S * B * HIDDEN * FP32
    for stage, rank in enumerate(measured):
        sent = pipeline_p2p_bytes(activation, stage, 4, micro_batches=3)
        received = pipeline_p2p_bytes(activation, 3 - stage, 4, micro_batches=3)
        pipeline = rank["pipeline"]
        assert (pipeline["sent"], pipeline["received"]) == (sent, received), f"stage {stage}"
        assert pipeline["pp_group_sent"] == sent, "4 stages talk on the pipeline group"


def test_counter_wraps_import_time_bindings_and_restores_them(measured):
    assert all(rank["restored"] for rank in measured)

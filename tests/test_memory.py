"""Memory formulas against the tensors of small CPU runs on 2 gloo ranks.

Parameters, gradient buffers and Adam state are measured from the tensors of a Megatron
``GPTModel`` wrapped in Megatron DDP after one optimizer step; saved activations from the
storages autograd keeps during one forward (``measure_saved_activations``), for GQA and
plain multi-head attention. Parameters, gradients and optimizer state must match the formulas
exactly. Activations may exceed the formula by at most ``ACTIVATION_SLACK`` (1%) and never fall
below it: the formula leaves out the int64 token ids and labels and the embedding's and the
loss's masks (about 2.3 KiB of 1.2-1.9 MiB here, 0.1-0.2%) and, for the redistribute strategy,
the causal masks of the query chunks that torch's CPU SDPA materializes (up to
``(2m+1) (s/2m)^2`` fp32 per layer, 0.7-0.8% here; CUDA kernels take the mask as a flag).
"""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed

LAYERS, HIDDEN, HEADS, GROUPS, SEQ, MICRO, VOCAB = 2, 128, 8, 4, 64, 2, 128
MODEL = ["--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN), "--num-attention-heads",
         str(HEADS), "--group-query-attention", "--num-query-groups", str(GROUPS),
         "--seq-length", str(SEQ), "--micro-batch-size", str(MICRO), "--vocab-size", str(VOCAB)]
LAYOUTS = {
    "TP=2": (["--tensor-model-parallel-size", "2"], dict(tp=2)),
    "TP=2+SP": (["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                dict(tp=2, sequence_parallel=True)),
    "helix 2x1 allreduce": (["--helix-m", "2", "--helix-score-strategy", "allreduce"],
                            dict(tp=2, helix_m=2, score_strategy="allreduce")),
    "helix 2x1 redistribute": (["--helix-m", "2", "--helix-score-strategy", "redistribute"],
                               dict(tp=2, helix_m=2, score_strategy="redistribute")),
    "ring R=2": (["--helix-ring-size", "2"], dict(cp=2)),
    "PP=2": (["--pipeline-model-parallel-size", "2"], dict(pp=2)),
    "TP=2 MHA": (["--tensor-model-parallel-size", "2", "--num-query-groups", str(HEADS)],
                 dict(tp=2)),
    "ring R=2 MHA": (["--helix-ring-size", "2", "--num-query-groups", str(HEADS)], dict(cp=2)),
}
ACTIVATION_SLACK = 0.01
# fp32 only: megatron-core 0.16.1's mixed-precision optimizer refuses CPU tensors, so the
# 16-bit terms (fp32 master copy) are Megatron's documented layout, not measured here.


def _measure(argv):
    """One layout on this rank: measured training state and one forward's saved activations."""
    import torch
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_helix import compat, trainer
    from megatron_helix.perf.memory import measure_saved_activations, measure_training_state
    from megatron_helix.synthetic_data import SuccessorTableData

    args = trainer.build_parser().parse_args(MODEL + argv)
    trainer.initialize(args)
    try:
        config = trainer.transformer_config(args, torch.float32)
        model = trainer.build_model(args, config)
        data = SuccessorTableData(VOCAB, SEQ, seed=1)
        batch = compat.get_batch_on_this_cp_rank(data.micro_batch(0, 0, MICRO))
        params = list(model.parameters())

        def forward():
            if not mpu.is_pipeline_first_stage():
                model.set_input_tensor(torch.zeros(SEQ, MICRO, HIDDEN, requires_grad=True))
            return model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                         labels=batch["labels"])

        activations, _ = measure_saved_activations(forward, exclude=params)
        ddp = DistributedDataParallel(
            config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
            module=model)
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-3, clip_grad=0.0), [ddp])
        out = forward()
        out.sum().backward()
        ddp.finish_grad_sync()
        optimizer.step()
        state = measure_training_state(ddp, optimizer)
        return {"parameters": state.parameters, "gradients": state.gradients,
                "optimizer": state.optimizer, "activations": activations,
                "stage": mpu.get_pipeline_model_parallel_rank()}
    finally:
        trainer.teardown()


def _world(rank, world_size):
    return {name: _measure(argv) for name, (argv, _) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_world, 2)


def _expected(name, stage):
    from megatron_helix.layerwise import ModelShape
    from megatron_helix.perf.layouts import ParallelLayout
    from megatron_helix.perf.memory import (
        Kernels,
        Precision,
        stage_activation_bytes,
        training_memory,
    )

    model = ModelShape(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                       ffn_hidden_size=4 * HIDDEN, vocab_size=VOCAB,
                       num_query_groups=HEADS if name.endswith("MHA") else GROUPS,
                       untie_embeddings_and_output_weights=True, make_vocab_size_divisible_by=1)
    layout = ParallelLayout(**LAYOUTS[name][1])
    kernels = Kernels.local_spec(layout)
    breakdown = training_memory(model, layout, MICRO, SEQ, 1, Precision.for_dtype("fp32"),
                                stage=stage, kernels=kernels)
    return breakdown, stage_activation_bytes(model, layout, stage, MICRO, SEQ, 1, 4, kernels)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_training_state_matches_formula(measured, name):
    for rank in measured:
        got = rank[name]
        expected, _ = _expected(name, got["stage"])
        assert got["parameters"] == expected.parameters, name
        assert got["gradients"] == expected.gradients, name
        assert got["optimizer"] == expected.optimizer, name


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_saved_activations_match_formula(measured, name):
    for rank in measured:
        _, expected = _expected(name, rank[name]["stage"])
        got = rank[name]["activations"]
        assert expected <= got <= expected * (1 + ACTIVATION_SLACK), (name, got, expected)


def test_helix_kv_cache_is_heads_times_dim_slice():
    from megatron_helix.layerwise import ModelShape
    from megatron_helix.perf.layouts import ParallelLayout
    from megatron_helix.perf.memory import kv_cache_bytes

    model = ModelShape(num_layers=4, hidden_size=4096, num_attention_heads=32,
                       ffn_hidden_size=16384, num_query_groups=8)
    helix = ParallelLayout(tp=16, helix_m=2)  # n = 8 head groups of 1 KV head, d/2 dims
    per_rank = kv_cache_bytes(model, helix, batch=1, seq_length=1000, e=2)
    assert per_rank == 4 * 1000 * 2 * (8 // 8) * (128 // 2) * 2
    full = kv_cache_bytes(model, ParallelLayout(), batch=1, seq_length=1000, e=2)
    assert per_rank * 16 == full

"""The layer-wise stage planner: exact, budget-respecting cuts that megatron-core 0.16.1 accepts."""

import itertools

import pytest

from megatron_helix.layerwise import (
    NAMED_BUDGETS,
    Budget,
    LayerwisePlanError,
    ModelShape,
    Stage,
    StagePlan,
    StageWorkingSet,
    Workload,
    evaluate_layout,
    even_cut,
    main,
    parse_budget,
    plan_for_world,
    plan_from_args,
    plan_layerwise,
    split_layout,
)
from megatron_helix.perf.calibration import GPU_SPECS

# Seed 003: 16 layers, hidden 4096, 32 heads of 128, MLP 16384, fp16, GPT-2 vocabulary.
SEED = ModelShape(num_layers=16, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=16384)
SEED_WEIGHTS = Workload("weights", micro_batch_size=128, seq_length=10000, dtype_bytes=2)

SMALL_MODELS = {
    "dense-gqa-vocab": ModelShape(12, 256, 8, 1024, num_query_groups=2, vocab_size=32000),
    "moe": ModelShape(8, 128, 4, 256, num_experts=8, moe_router_topk=2, vocab_size=5000),
    "swiglu-rmsnorm": ModelShape(10, 192, 6, 512, gated_linear_unit=True, add_bias_linear=False,
                                 normalization="RMSNorm", vocab_size=1000),
    "no-vocab": ModelShape(9, 128, 4, 512),
}
WORKLOADS = [Workload(mode, micro_batch_size=2, seq_length=64) for mode in
             ("weights", "decode", "forward", "training")]
HUGE = Budget("unbounded", 10**15, "memory")


def assert_valid_cut(plan: StagePlan) -> None:
    placed = [layer for stage in plan.stages for layer in stage.layers]
    assert placed == list(range(plan.model.num_layers)), "every layer exactly once, in order"
    assert all(stage.num_layers >= 1 for stage in plan.stages[1:-1])
    assert plan.fits and all(s.working_set.total <= plan.budget.bytes for s in plan.stages)


# ---------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("text, expected", [
    ("50MB", 50_000_000), ("50MiB", 52_428_800), ("80GB", 80_000_000_000),
    ("1.5GiB", 1_610_612_736), ("52428800", 52_428_800), (" 64 kib ", 65_536), ("7B", 7),
    ("h100", 52_428_800), ("H200", 62_914_560), ("h100-l2-persisting", 39_321_600),
    ("h100-smem", 132 * 233_472), (123, 123),
])
def test_budget_parser(text, expected):
    assert parse_budget(text).bytes == expected


def test_budget_parser_kinds_and_errors():
    assert parse_budget("h100-hbm").kind == "memory" and parse_budget("h100").kind == "cache"
    assert parse_budget("80GB", kind="memory").kind == "memory"
    assert NAMED_BUDGETS["h200-hbm"].bytes > NAMED_BUDGETS["h100-hbm"].bytes
    # HBM is the datasheets' figure the cost model's GPU specs use, not a second copy.
    assert NAMED_BUDGETS["h100-hbm"].bytes == GPU_SPECS["h100"]["memory_bytes"] == 80 * 10**9
    assert NAMED_BUDGETS["h200-hbm"].bytes == GPU_SPECS["h200"]["memory_bytes"]
    for bad in ("50 parsecs", "", "MB", "-5MB", "0.5B", "0"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


# ------------------------------------------------------------------------ working sets


def test_layer_weights_exact_for_the_seed_model():
    D, F = 4096, 16384
    bare = ModelShape(16, D, 32, F, add_bias_linear=False, normalization="RMSNorm")
    norms = 2 * D * 2  # two RMSNorm weights in fp16: the seed's "16.4 KB"
    assert bare.layer_params() * 2 == (4 * D * D + 2 * D * F) * 2 + norms == 402_669_568
    gated = ModelShape(16, D, 32, F, gated_linear_unit=True, add_bias_linear=False,
                       normalization="RMSNorm")
    assert gated.layer_params() * 2 == (4 * D * D + 3 * D * F) * 2 + norms
    # The seed's "268.4 MB" is the gated layer's parameter count in millions, not bytes.
    assert 4 * D * D + 3 * D * F == 268_435_456
    # Megatron's defaults add biases and LayerNorm biases: 402.8 MB.
    assert SEED.layer_params() * 2 == 402_653_184 + 2 * (3 * D + D + F + D) + 2 * 4 * D


def test_tensor_split_and_moe_parameter_counts():
    model = ModelShape(2, 64, 4, 256, add_bias_linear=False, normalization="RMSNorm")
    matrices = 4 * 64 * 64 + 2 * 64 * 256
    assert model.layer_params(4) == matrices // 4 + 2 * 64  # norms are replicated
    moe = ModelShape(2, 64, 4, 256, num_experts=8, add_bias_linear=False,
                     normalization="RMSNorm")
    assert moe.layer_params(1) == 4 * 64 * 64 + 8 * 2 * 64 * 256 + 64 * 8 + 2 * 64
    vocab = ModelShape(2, 64, 4, 256, vocab_size=50257)
    assert vocab.padded_vocab(1) == 50304 and vocab.padded_vocab(8) == 51200


def test_invalid_shapes_explain_themselves():
    with pytest.raises(ValueError, match="num_query_groups 3"):
        ModelShape(4, 64, 4, 128, num_query_groups=3)
    with pytest.raises(ValueError, match="mode 'infer'"):
        Workload("infer", 1, 8)
    with pytest.raises(ValueError, match="cannot hold"):
        plan_layerwise(ModelShape(2, 64, 4, 128), WORKLOADS[0], 5, HUGE)
    with pytest.raises(ValueError, match="neither tensor parallelism"):
        split_layout(ModelShape(2, 64, 4, 128), 3)
    assert split_layout(SEED, 16) is None and split_layout(SEED, 64) == (2, 32)


# The stage layouts perf.memory prices: TP, TP + SP, helix m x n (s = 128 splits into 2m chunks,
# so Megatron's ``auto`` takes redistribute), and helix with s = 100 (it cannot: score all-reduce).
PRICED_LAYOUTS = {
    "TP=1": (1, 128, dict(tp=1)),
    "TP=2+SP": (2, 128, dict(tp=2, sequence_parallel=True)),
    "helix 2x2": (4, 128, dict(tp=4, helix_m=2, sequence_parallel=True,
                               score_strategy="redistribute")),
    "helix 4x2, s=100": (8, 100, dict(tp=8, helix_m=4, sequence_parallel=True,
                                      score_strategy="allreduce")),
}


@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
@pytest.mark.parametrize("split, seq, layout", PRICED_LAYOUTS.values(), ids=PRICED_LAYOUTS)
def test_training_working_set_is_perf_memorys_model(split, seq, layout, untied):
    """The planner prices a training stage with ``perf.memory``, the model that
    ``tests/test_memory.py`` holds to measurement on CPU runs (parameters, gradients and
    optimizer state exactly, saved activations within 1%). This test checks equality with that
    model, not a measurement of its own: on an even cut under a memory budget each stage's
    working set is ``training_memory`` of the same layout (bf16: 2 B parameters, 16 B of
    gradient and Adam state per parameter, ``p - i`` micro-batches in flight on stage ``i``)."""
    from megatron_helix.perf.layouts import ParallelLayout
    from megatron_helix.perf.memory import Precision, training_memory

    model = ModelShape(8, 256, 8, 1024, num_query_groups=2, vocab_size=3000,
                       untie_embeddings_and_output_weights=untied)
    workload = Workload("training", micro_batch_size=2, seq_length=seq)
    plan = evaluate_layout(model, workload, even_cut(8, 4), HUGE, tensor_split=split)
    priced = ParallelLayout(pp=4, **layout)
    for stage in plan.stages:
        expected = training_memory(model, priced, 2, seq, 4, Precision.for_dtype("bf16"),
                                   stage=stage.index)
        ws = stage.working_set
        assert ws.weight_bytes == expected.parameters
        assert ws.state_bytes == expected.gradients + expected.optimizer
        assert ws.activation_bytes == expected.activations
        assert ws.total == expected.total


def test_uneven_stages_are_priced_with_their_own_layer_counts():
    """Uneven cuts: each stage's saved activations (training) and KV cache (decode) are
    ``perf.memory``'s for that stage's layer count."""
    from megatron_helix.perf.layouts import ParallelLayout
    from megatron_helix.perf.memory import kv_cache_bytes, stage_activation_bytes

    model = ModelShape(7, 128, 4, 512, vocab_size=1000)
    counts, layout = [3, 1, 2, 1], ParallelLayout(tp=2, pp=4, sequence_parallel=True)
    training = evaluate_layout(model, Workload("training", 2, 64), counts, HUGE, 2)
    decode = evaluate_layout(model, Workload("decode", 2, 64), counts, HUGE, 2)
    for stage, cached in zip(training.stages, decode.stages):
        assert stage.working_set.activation_bytes == stage_activation_bytes(
            model, layout, stage.index, 2, 64, 4, 2, layers=stage.num_layers) > 0
        assert cached.working_set.state_bytes == kv_cache_bytes(
            model, layout, 2, 64, 2, layers=stage.num_layers) > 0


def test_stage_plan_rejects_a_gap():
    ws = StageWorkingSet(1, 0, 0)
    stages = (Stage(0, 0, 1, ws, 1, True), Stage(1, 2, 1, ws, 1, True))
    with pytest.raises(ValueError, match="not contiguous"):
        StagePlan(ModelShape(2, 64, 4, 128), WORKLOADS[0], HUGE, 1, "bytes", stages)


# ------------------------------------------------------------------ exactness and balance


def every_cut(layers, stages):
    """All layer counts with non-empty middle stages (the ends may hold only E / L)."""
    for counts in itertools.product(range(layers + 1), repeat=stages):
        if sum(counts) == layers and all(counts[1:-1]):
            yield list(counts)


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.mode)
def test_dynamic_program_matches_brute_force(workload):
    model = ModelShape(7, 64, 4, 256, vocab_size=3000)
    for stages in (3, 4):
        cuts = [evaluate_layout(model, workload, counts, HUGE) for counts in every_cut(7, stages)]
        tightest = min(cut.max_bytes for cut in cuts)
        for budget_bytes in (tightest, int(tightest * 1.3), 10**15):
            budget = Budget("b", budget_bytes, "memory")
            plan = plan_layerwise(model, workload, stages, budget)
            assert_valid_cut(plan)
            assert plan.max_cost == min(c.max_cost for c in cuts if c.max_bytes <= budget_bytes)


@pytest.mark.parametrize("name", SMALL_MODELS)
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.mode)
def test_plans_are_valid_and_never_worse_than_the_even_split(name, workload):
    model = SMALL_MODELS[name]
    for stages in (s for s in (1, 2, 3, 4) if s <= model.num_layers):
        plan = plan_layerwise(model, workload, stages, HUGE)
        assert_valid_cut(plan)
        assert plan.num_stages == stages
        if model.num_layers % stages == 0:
            even = evaluate_layout(model, workload, even_cut(model.num_layers, stages), HUGE)
            assert plan.max_cost <= even.max_cost
            tight = Budget("even", even.max_bytes, "memory")
            assert plan_layerwise(model, workload, stages, tight).max_cost <= even.max_cost


def test_heavy_output_layer_gets_a_lighter_last_stage():
    model = ModelShape(16, 512, 8, 2048, vocab_size=128_000)
    workload = Workload("training", micro_batch_size=1, seq_length=512)
    plan = plan_layerwise(model, workload, 4, HUGE)
    even = evaluate_layout(model, workload, even_cut(16, 4), HUGE)
    assert plan.layer_counts[-1] < plan.layer_counts[1]
    assert plan.max_cost < even.max_cost
    assert plan.pipeline_layout.endswith("L") and plan.pipeline_layout.startswith("E")


def test_memory_budget_forces_uneven_training_stages():
    """1F1B keeps p - i micro-batches of activations on stage i: the first stage fills first."""
    model = ModelShape(8, 256, 4, 1024)
    workload = Workload("training", micro_batch_size=4, seq_length=256)
    even = evaluate_layout(model, workload, even_cut(8, 4), HUGE)
    assert even.stages[0].working_set.total > even.stages[-1].working_set.total
    budget = Budget("tight", even.stages[0].working_set.total - 1, "memory")
    plan = plan_layerwise(model, workload, 4, budget)
    assert_valid_cut(plan)
    assert plan.layer_counts[0] < 2
    assert not evaluate_layout(model, workload, even_cut(8, 4), budget).fits


# ---------------------------------------------------------------------------- refusals


def test_seed_003_layer_does_not_fit_h100_l2():
    with pytest.raises(LayerwisePlanError) as refusal:
        plan_layerwise(SEED, SEED_WEIGHTS, 16, "h100")
    message = str(refusal.value)
    assert "402.8 MB of weights" in message and "52,428,800 B" in message
    assert "7.68x the budget" in message
    assert "smallest tensor split that fits 16 stages: 8 (TP=8), i.e. 128 devices" in message
    assert refusal.value.min_tensor_split == 8
    assert refusal.value.plan.layer_counts == [1] * 16 and not refusal.value.plan.fits
    fitting = plan_layerwise(SEED, SEED_WEIGHTS, 16, "h100", tensor_split=8)
    assert fitting.fits and fitting.max_bytes < 52_428_800
    # "50MB" is 50 * 10^6 B, less than the H100's 50 MiB: a TP=8 stage (50.4 MB) misses it.
    with pytest.raises(LayerwisePlanError) as decimal:
        plan_layerwise(SEED, SEED_WEIGHTS, 16, "50MB")
    assert decimal.value.min_tensor_split == 16
    assert plan_layerwise(SEED, SEED_WEIGHTS, 16, "h100-hbm").fits


def test_seed_003_with_its_vocabulary_needs_a_split_of_16():
    seed_vocab = ModelShape(16, 4096, 32, 16384, vocab_size=50257)
    with pytest.raises(LayerwisePlanError) as refusal:
        plan_layerwise(seed_vocab, SEED_WEIGHTS, 16, "h100")
    assert refusal.value.min_tensor_split == 16
    with pytest.raises(LayerwisePlanError, match="no layout of 16 devices fits"):
        plan_for_world(seed_vocab, SEED_WEIGHTS, 16, "h100")
    plan = plan_for_world(seed_vocab, SEED_WEIGHTS, 256, "h100")
    assert (plan.num_stages, plan.tensor_split) == (16, 16) and plan.fits


def test_needed_budget_is_tight():
    model = ModelShape(6, 128, 4, 512, vocab_size=2000)
    workload = Workload("decode", 4, 128)
    with pytest.raises(LayerwisePlanError) as refusal:
        plan_layerwise(model, workload, 3, 1000)
    needed = refusal.value.needed_budget
    assert needed == refusal.value.plan.max_bytes
    assert plan_layerwise(model, workload, 3, needed).max_bytes <= needed
    with pytest.raises(LayerwisePlanError):
        plan_layerwise(model, workload, 3, needed - 1)


def test_helix_split_is_proposed_beyond_the_kv_groups():
    model = ModelShape(4, 1024, 8, 4096, num_query_groups=2, add_bias_linear=False)
    with pytest.raises(LayerwisePlanError) as refusal:
        plan_layerwise(model, Workload("weights", 1, 1), 4, 2_000_000)
    assert refusal.value.min_tensor_split > 2
    assert "helix m=" in str(refusal.value)
    plan = plan_layerwise(model, Workload("weights", 1, 1), 4, 2_000_000,
                          refusal.value.min_tensor_split)
    assert plan.helix is not None and "--helix-m" in plan.megatron_args


# ------------------------------------------------------------ megatron-core acceptance


@pytest.fixture(scope="module")
def megatron():
    import torch
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    def config(plan, **kwargs):
        return TransformerConfig(
            num_layers=plan.model.num_layers, hidden_size=plan.model.hidden_size,
            num_attention_heads=plan.model.num_attention_heads, pipeline_dtype=torch.float16,
            **kwargs,
        )

    return config, get_num_layers_to_build, get_transformer_layer_offset


def megatron_test_plans():
    training = Workload("training", 1, 512)
    uneven = plan_layerwise(ModelShape(16, 512, 8, 2048, vocab_size=16_000), training, 4, HUGE)
    seed_vocab = ModelShape(16, 4096, 32, 16384, vocab_size=50257)
    empty_last = plan_layerwise(seed_vocab, SEED_WEIGHTS, 16, "h100", tensor_split=16)
    return {"uneven": uneven, "empty-last-stage": empty_last}


def test_megatron_core_accepts_the_layout(megatron):
    config, _, _ = megatron
    plans = megatron_test_plans()
    assert plans["uneven"].layer_counts == [4, 5, 5, 2]
    assert plans["empty-last-stage"].layer_counts[-1] == 0
    for plan in plans.values():
        layout = config(plan, **plan.transformer_config_kwargs).pipeline_model_parallel_layout
        assert type(layout).__name__ == "PipelineParallelLayerLayout"
        for stage in plan.stages:
            assert layout.get_num_layers_to_build(pp_rank=stage.index) == stage.num_layers
            assert layout.get_layer_offset(pp_rank=stage.index) == stage.first_layer


def test_megatron_core_accepts_first_last_stage_counts(megatron):
    config, layers_to_build, layer_offset = megatron
    plan = megatron_test_plans()["uneven"]
    kwargs = plan.first_last_kwargs
    assert kwargs is not None
    cfg = config(plan, pipeline_model_parallel_size=plan.num_stages, **kwargs)
    for stage in plan.stages:
        assert layers_to_build(cfg, pp_rank=stage.index) == stage.num_layers
        assert layer_offset(cfg, pp_rank=stage.index) == stage.first_layer
    assert megatron_test_plans()["empty-last-stage"].first_last_kwargs is None


# ------------------------------------------------------------------------- entry points


def test_plan_from_args_is_the_trainer_entry_point():
    plan = plan_from_args(
        num_layers=8, hidden_size=256, num_attention_heads=8, num_query_groups=4,
        ffn_hidden_size=1024, num_experts=None, seq_length=128, micro_batch_size=2,
        dtype_bytes=2, pipeline_model_parallel_size=4, budget="80GB", budget_kind="memory",
        vocab_size=32000,
    )
    assert plan.workload.mode == "training" and plan.budget.bytes == 80 * 10**9
    assert plan.stages[0].working_set.weight_bytes > 32000 * 256 * 2  # the whole table
    assert plan.transformer_config_kwargs["pipeline_model_parallel_size"] == 4
    assert plan.transformer_config_kwargs["pipeline_model_parallel_layout"] == plan.pipeline_layout
    with pytest.raises(ValueError, match="exactly one"):
        plan_from_args(num_layers=8, hidden_size=256, num_attention_heads=8,
                       ffn_hidden_size=1024, seq_length=128, micro_batch_size=2, budget="1GB")


def test_cli_refuses_the_seed_and_prints_the_way_out(capsys):
    seed_args = ["--num-layers", "16", "--hidden-size", "4096", "--num-attention-heads", "32",
                 "--ffn-hidden-size", "16384", "--seq-length", "10000",
                 "--micro-batch-size", "128", "--mode", "weights", "--budget", "h100",
                 "--pipeline-model-parallel-size", "16"]
    assert main(seed_args) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "TP=8" in out and "fits: NO" in out
    assert main(seed_args + ["--tensor-model-parallel-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "--pipeline-model-parallel-layout 'Et|t|t" in out and "fits: yes" in out

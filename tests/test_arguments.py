"""The helix flags, their translation into Megatron's parallel sizes, the errors that name the
flags, the layer-spec choice, and the launcher's hooks into an unmodified Megatron-LM.

No Megatron-LM checkout is needed: a parser with the Megatron-LM flags these functions read
stands in for Megatron's, and fake ``megatron.training`` modules stand in for its training loop
(``tests/test_patch.py`` runs the same hooks against a real core_v0.16.1 checkout).
"""

from __future__ import annotations

import argparse
import sys
import types

import pytest

from megatron_helix import arguments as helix_args
from megatron_helix.arguments import (
    HelixConfigError,
    add_helix_args,
    apply_helix_args,
    helix_args_provider,
    helix_spec_from_args,
    rope_pairing_from_args,
    uses_helix,
)

# Seed 000's model: 32 heads of 128, hidden 4096.
SEED000 = ["--num-layers", "4", "--hidden-size", "4096", "--num-attention-heads", "32",
           "--ffn-hidden-size", "16384", "--seq-length", "10000", "--micro-batch-size", "1"]


def megatron_parser() -> argparse.ArgumentParser:
    """The Megatron-LM flags ``megatron_helix.arguments`` reads, with Megatron's defaults."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--context-parallel-size"):
        parser.add_argument(flag, type=int, default=1)
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--kv-channels",
                 "--num-query-groups", "--ffn-hidden-size", "--seq-length", "--micro-batch-size",
                 "--num-experts", "--mtp-num-layers", "--vocab-size"):
        parser.add_argument(flag, type=int, default=None)
    for flag in ("--group-query-attention", "--rotary-interleaved", "--multi-latent-attention",
                 "--moe-grouped-gemm", "--qk-layernorm", "--fp16", "--bf16"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--position-embedding-type", default="learned_absolute",
                        choices=["learned_absolute", "rope", "mrope", "relative", "none"])
    parser.add_argument("--rotary-percent", type=float, default=1.0)
    parser.add_argument("--transformer-impl", default="transformer_engine",
                        choices=["local", "transformer_engine", "inference_optimized"])
    parser.add_argument("--normalization", default="LayerNorm")
    parser.add_argument("--spec", nargs="*", default=None)
    parser.add_argument("--pipeline-model-parallel-layout", default=None)
    parser.add_argument("--attention-dropout", type=float, default=0.1)
    parser.add_argument("--cp-comm-type", nargs="+", default=["p2p"])
    parser.add_argument("--window-size", default=None)
    parser.add_argument("--softmax-type", default="vanilla")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--sft", action="store_true")
    for flag in ("--attention-output-gate", "--qk-l2-norm", "--qk-clip",
                 "--log-max-attention-logit", "--batch-invariant-mode", "--use-mup"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--flash-attention-version", type=int, default=None)
    for flag in ("--save", "--load", "--pretrained-checkpoint"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--ckpt-format", default="torch_dist",
                        choices=["torch", "torch_dist", "torch_dcp", "fsdp_dtensor"])
    parser.add_argument("--ckpt-step", type=int, default=None)
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    parser.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true")
    return add_helix_args(parser)


def parse(*argv: str) -> argparse.Namespace:
    return megatron_parser().parse_args(list(argv))


def apply(*argv: str, world_size: int | None = 16) -> argparse.Namespace:
    args = parse(*argv)
    apply_helix_args(args, world_size=world_size)
    return args


def problems(*argv: str, world_size: int | None = 16) -> str:
    with pytest.raises(HelixConfigError) as error:
        apply(*argv, world_size=world_size)
    return str(error.value)


# ------------------------------------------------------------------------------ parsing


def test_defaults_leave_megatron_alone():
    args = parse(*SEED000, "--tensor-model-parallel-size", "8")
    assert (args.helix_m, args.helix_n, args.helix_ring_size) == (1, 1, 1)
    assert args.helix_score_strategy == "auto"
    assert not args.helix_layerwise and args.helix_cache_budget is None
    assert not uses_helix(args)
    assert apply_helix_args(args, world_size=16) is None
    assert args.tensor_model_parallel_size == 8


def test_every_flag_parses():
    args = parse("--helix-m", "4", "--helix-n", "2", "--helix-ring-size", "2",
                 "--helix-score-strategy", "redistribute", "--helix-layerwise",
                 "--helix-cache-budget", "50MB")
    assert (args.helix_m, args.helix_n, args.helix_ring_size) == (4, 2, 2)
    assert args.helix_score_strategy == "redistribute"
    assert args.helix_layerwise and args.helix_cache_budget == "50MB"


@pytest.mark.parametrize("argv, message", [
    (["--helix-score-strategy", "gather"], "invalid choice: 'gather'"),
    (["--helix-cache-budget", "50 parsecs"], "cannot read budget '50 parsecs'"),
    (["--helix-m", "four"], "invalid int value"),
])
def test_bad_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


def test_provider_chains_after_the_scripts_own():
    seen = []

    def own(parser):
        seen.append(parser)
        parser.add_argument("--own-flag", action="store_true")
        return parser

    parser = helix_args_provider(own)(argparse.ArgumentParser())
    args = parser.parse_args(["--own-flag", "--helix-n", "2"])
    assert len(seen) == 1 and args.own_flag and args.helix_n == 2
    assert helix_args_provider(None)(argparse.ArgumentParser()).parse_args([]).helix_m == 1


def test_a_parser_without_helix_flags_is_left_alone():
    args = argparse.Namespace(tensor_model_parallel_size=8)
    assert apply_helix_args(args) is None
    assert args == argparse.Namespace(tensor_model_parallel_size=8)


# ------------------------------------------------------------------- sizes from the flags


def test_helix_group_becomes_tensor_parallel_size():
    args = apply(*SEED000, "--helix-m", "4", "--helix-n", "4")
    assert args.tensor_model_parallel_size == 16
    assert args.context_parallel_size == 1 and args.pipeline_model_parallel_size == 1
    dims = apply_helix_args(parse(*SEED000, "--helix-m", "4", "--helix-n", "4"), world_size=32)
    assert (dims.helix, dims.ring, dims.pp, dims.dp) == (16, 1, 1, 2)


def test_tensor_parallel_size_equal_to_the_helix_group_is_consistent():
    args = apply(*SEED000, "--helix-m", "4", "--helix-n", "4", "--tensor-model-parallel-size", "16")
    assert args.tensor_model_parallel_size == 16


def test_contradicting_tensor_parallel_size_names_both_flags():
    message = problems(*SEED000, "--helix-m", "4", "--helix-n", "4",
                       "--tensor-model-parallel-size", "8")
    assert "--tensor-model-parallel-size 8 contradicts --helix-m 4 x --helix-n 4 = 16" in message
    assert "set it to 16" in message


def test_tensor_parallel_size_without_helix_group_points_at_helix_n():
    message = problems(*SEED000, "--helix-ring-size", "2", "--tensor-model-parallel-size", "8")
    assert "--tensor-model-parallel-size 8 contradicts --helix-m 1 x --helix-n 1 = 1" in message
    assert "--helix-n 8 splits whole heads 8 ways" in message


def test_ring_becomes_context_parallel_size():
    args = apply(*SEED000, "--helix-ring-size", "8")
    assert args.context_parallel_size == 8 and args.tensor_model_parallel_size == 1


def test_contradicting_context_parallel_size_names_both_flags():
    message = problems(*SEED000, "--helix-ring-size", "4", "--context-parallel-size", "2")
    assert "--context-parallel-size 2 contradicts --helix-ring-size 4 = 4" in message


def test_megatron_context_parallel_size_alone_is_the_helix_ring():
    args = apply(*SEED000, "--helix-m", "2", "--helix-n", "2",
                 "--context-parallel-size", "4")
    assert args.helix_ring_size == args.context_parallel_size == 4
    assert args.tensor_model_parallel_size == 4


def test_every_problem_is_reported_at_once():
    message = problems(*SEED000, "--helix-m", "4", "--helix-n", "4",
                       "--tensor-model-parallel-size", "8", "--helix-ring-size", "3",
                       "--context-parallel-size", "2", world_size=48)
    assert "--tensor-model-parallel-size 8 contradicts" in message
    assert "--context-parallel-size 2 contradicts" in message
    assert "--seq-length 10000 must be divisible by 2 x --helix-ring-size = 6" in message


# --------------------------------------------------------------------------- world size


def test_world_size_must_hold_the_layout():
    message = problems(*SEED000, "--helix-m", "4", "--helix-n", "4", world_size=24)
    assert "world size 24 is not divisible by --helix-m 4 x --helix-n 4" in message


def test_world_size_comes_from_args_then_environment(monkeypatch):
    flags = [*SEED000, "--helix-m", "4", "--helix-n", "4"]
    args = parse(*flags)
    args.world_size = 8  # what Megatron's parse_args sets from WORLD_SIZE
    with pytest.raises(HelixConfigError, match="world size 8"):
        apply_helix_args(args)
    monkeypatch.setenv("WORLD_SIZE", "12")
    with pytest.raises(HelixConfigError, match="world size 12"):
        apply_helix_args(parse(*flags))
    monkeypatch.delenv("WORLD_SIZE")
    assert apply_helix_args(parse(*flags)).world_size == 16  # unknown: shape checks only


# ------------------------------------------------------------------------- model shape


@pytest.mark.parametrize("argv, message", [
    (["--num-attention-heads", "12", "--hidden-size", "1536", "--helix-n", "8"],
     "--helix-n 8 must divide --num-attention-heads 12"),
    (["--group-query-attention", "--num-query-groups", "2", "--helix-n", "4"],
     "--helix-n 4 must divide --num-query-groups 2"),
    (["--position-embedding-type", "rope", "--kv-channels", "100", "--helix-m", "4"],
     "head dim 100 (--kv-channels) must be divisible by 2*m = 8"),
    (["--position-embedding-type", "rope", "--rotary-interleaved", "--kv-channels", "100",
      "--helix-m", "4"], "with interleaved RoPE the head dim 100"),
    (["--seq-length", "100", "--helix-ring-size", "16"],
     "--seq-length 100 must be divisible by 2 x --helix-ring-size = 32"),
])
def test_shape_errors_name_the_flags(argv, message):
    assert message in problems(*SEED000, *argv)


def test_head_dim_without_rope_needs_only_m_to_divide_it():
    args = apply(*SEED000, "--kv-channels", "100", "--helix-m", "4")
    assert args.tensor_model_parallel_size == 4


def test_rope_pairing():
    assert rope_pairing_from_args(parse()) == "none"
    assert rope_pairing_from_args(parse("--position-embedding-type", "rope")) == "rotate_half"
    assert rope_pairing_from_args(
        parse("--position-embedding-type", "rope", "--rotary-interleaved")) == "interleaved"
    assert rope_pairing_from_args(argparse.Namespace(use_rotary_position_embeddings=True)) == \
        "rotate_half"


@pytest.mark.parametrize("argv, message", [
    (["--multi-latent-attention"], "--multi-latent-attention (MLA has its own projections) cannot"),
    (["--mtp-num-layers", "1"], "--mtp-num-layers cannot be combined"),
    (["--transformer-impl", "inference_optimized"], "inference_optimized has no helix spec"),
    (["--spec", "my.module", "my_spec"], "--spec my.module my_spec would replace"),
    (["--attention-backend", "local"], "--attention-backend local replaces the helix core"),
    (["--position-embedding-type", "mrope"], "--position-embedding-type mrope is not supported"),
    (["--position-embedding-type", "rope", "--rotary-percent", "0.5"],
     "--rotary-percent 0.5 with --helix-m 2"),
])
def test_features_helix_attention_cannot_build(argv, message):
    assert message in problems(*SEED000, "--helix-m", "2", "--helix-n", "2", *argv)


@pytest.mark.parametrize("argv, message", [
    (["--helix-ring-size", "2", "--cp-comm-type", "a2a"],
     "--cp-comm-type a2a with --helix-ring-size 2"),
    (["--helix-ring-size", "2", "--window-size", "(64,0)"],
     "--window-size with --helix-ring-size 2"),
    (["--helix-ring-size", "2", "--helix-m", "2", "--helix-n", "32"],
     "each head group's 1 heads and 1 key/value heads (--helix-n 32) must divide by --helix-m 2"),
    (["--helix-n", "2", "--softmax-type", "off-by-one"],
     "--softmax-type off-by-one: helix attention supports vanilla softmax"),
    (["--helix-n", "2", "--sft"], "--sft cannot be combined with helix attention"),
    (["--helix-n", "2", "--attention-output-gate"],
     "--attention-output-gate (the helix attention has no output gate) cannot be combined"),
    (["--helix-n", "2", "--qk-l2-norm"], "--qk-l2-norm (the head-dim-sliced q/k norm"),
    (["--helix-n", "2", "--qk-clip"], "--qk-clip (QK-clip rescales linear_qkv rows"),
    (["--helix-n", "2", "--log-max-attention-logit"], "--log-max-attention-logit (the helix"),
    (["--helix-n", "2", "--batch-invariant-mode"], "--batch-invariant-mode (the helix block"),
    (["--helix-n", "2", "--flash-attention-version", "3"],
     "--flash-attention-version (the helix block kernels choose their own kernel"),
    (["--helix-n", "2", "--use-mup"], "--use-mup (muP has not been tested"),
])
def test_run_time_refusals_are_argument_errors(argv, message):
    assert message in problems(*SEED000, *argv, world_size=None)


def test_ring_with_dim_slices_that_leave_whole_heads_per_rank():
    args = apply(*SEED000, "--helix-ring-size", "2", "--helix-m", "2",
                 "--helix-n", "2", world_size=None)
    assert (args.tensor_model_parallel_size, args.context_parallel_size) == (4, 2)


def test_features_allowed_without_dim_slices():
    apply(*SEED000, "--helix-n", "4", "--qk-layernorm", "--position-embedding-type", "rope",
          "--rotary-percent", "0.5")
    apply(*SEED000, "--helix-n", "4", "--spec", "megatron_helix.specs", "helix_layer_local_spec")


def test_qk_layernorm_allowed_with_dim_slices():
    apply(*SEED000, "--helix-m", "2", "--helix-n", "2", "--qk-layernorm")
    apply(*SEED000, "--helix-m", "4", "--helix-n", "1", "--qk-layernorm",
          "--normalization", "RMSNorm")


# ---------------------------------------------------------------------------- layer-wise


def test_layerwise_is_one_layer_per_stage_unless_told():
    assert apply(*SEED000, "--helix-layerwise", world_size=4).pipeline_model_parallel_size == 4
    args = apply(*SEED000, "--helix-layerwise", "--pipeline-model-parallel-size", "2",
                 world_size=4)
    assert args.pipeline_model_parallel_size == 2


def test_cache_budget_runs_the_planner_and_sets_the_layout():
    args = apply(*SEED000, "--fp16", "--helix-layerwise", "--helix-cache-budget", "h100-hbm",
                 world_size=4)
    assert args.pipeline_model_parallel_size == 4
    assert args.pipeline_model_parallel_layout == "Et|t|t|tL"


def test_seed_003_budget_is_refused_with_the_planners_reasons():
    seed003 = [*SEED000, "--num-layers", "16", "--fp16", "--helix-layerwise",
               "--helix-cache-budget", "50MB"]
    message = problems(*seed003)
    assert "--helix-layerwise --helix-cache-budget 50MB: no cut of 16 decoder layers" in message
    assert "one decoder layer holds" in message


def test_cache_budget_problems():
    assert "--helix-cache-budget needs --helix-layerwise" in problems(
        *SEED000, "--helix-cache-budget", "50MB")
    assert "--pipeline-model-parallel-layout and --helix-cache-budget both cut" in problems(
        *SEED000, "--helix-layerwise", "--helix-cache-budget", "h100-hbm",
        "--pipeline-model-parallel-layout", "Et|tL")
    assert "--helix-cache-budget needs --ffn-hidden-size" in problems(
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "1",
        "--helix-layerwise", "--helix-cache-budget", "1GB")


# ------------------------------------------------------------------------- spec choice


@pytest.fixture
def spec_calls(monkeypatch):
    """Record what ``helix_spec_from_args`` asks of ``specs.get_gpt_layer_helix_spec``."""
    calls = []
    fake = types.ModuleType("megatron_helix.specs")
    fake.get_gpt_layer_helix_spec = lambda **kwargs: calls.append(kwargs) or kwargs
    monkeypatch.setitem(sys.modules, "megatron_helix.specs", fake)
    return calls


@pytest.mark.parametrize("argv, expected", [
    (["--transformer-impl", "local"], dict(use_te=False, num_experts=None, ring=False)),
    ([], dict(use_te=True, num_experts=None)),
    (["--num-experts", "8", "--moe-grouped-gemm"], dict(num_experts=8, moe_grouped_gemm=True)),
    (["--num-experts", "0"], dict(num_experts=None)),
    (["--qk-layernorm", "--helix-m", "1"], dict(qk_layernorm=True)),
    (["--helix-score-strategy", "allreduce"], dict(score_strategy="allreduce")),
    ([], dict(decode_mode="auto")),
    (["--helix-decode", "kv-parallel"], dict(decode_mode="kv-parallel")),
    (["--helix-ring-size", "2"], dict(ring=True)),
    (["--position-embedding-type", "rope", "--normalization", "RMSNorm"],
     dict(position_embedding_type="rope", normalization="RMSNorm")),
])
def test_spec_choice(spec_calls, argv, expected):
    args = apply(*SEED000, "--helix-n", "4", *argv)
    helix_spec_from_args(args)
    (call,) = spec_calls
    assert {key: call[key] for key in expected} == expected


def test_spec_choice_builds_megatrons_local_spec_with_helix_attention():
    specs = pytest.importorskip("megatron_helix.specs")
    args = apply(*SEED000, "--helix-m", "2", "--helix-n", "2", "--transformer-impl", "local",
                 "--num-experts", "4")
    spec = helix_spec_from_args(args)
    attention = spec.submodules.self_attention
    assert attention.module.__name__ == "HelixSelfAttention"
    assert attention.submodules.core_attention.module.__name__ == "HelixCoreAttention"
    mlp = spec.submodules.mlp  # a ModuleSpec, or from megatron-core 0.19 a functools.partial
    assert getattr(mlp, "module", getattr(mlp, "func", None)).__name__ == "MoELayer"
    assert isinstance(spec, type(specs.helix_layer_local_spec))


# ------------------------------------------------ --spec MODULE NAME (the no-patch path)


def test_megatron_spec_flag_loads_the_local_helix_spec():
    """``--spec megatron_helix.specs helix_layer_local_spec`` as Megatron-LM loads it.

    core_v0.16.1's ``gpt_builders.gpt_builder`` calls
    ``megatron.core.transformer.spec_utils.import_module(args.spec)`` (``__import__`` the
    module, then ``vars(module)[name]``); that function ships in the megatron-core wheel.
    """
    pytest.importorskip("megatron_helix.specs")
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    spec = import_module(["megatron_helix.specs", "helix_layer_local_spec"])
    assert isinstance(spec, ModuleSpec)
    assert spec.submodules.self_attention.module.__name__ == "HelixSelfAttention"


def test_megatron_spec_flag_loads_the_te_helix_spec():
    """The same lookup reads the module's ``vars``: a lazily built (``__getattr__``) spec is
    invisible to it, so the TE spec must be a real module attribute where TE is installed."""
    pytest.importorskip("transformer_engine")
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    assert isinstance(import_module(["megatron_helix.specs", "helix_layer_te_spec"]), ModuleSpec)


# ------------------------------------------------------------------- launcher hooks


@pytest.fixture(params=["core_v0.16.1", "core_v0.19.0"])
def fake_megatron_lm(request, monkeypatch):
    """``megatron.training.{arguments,initialize,global_vars}`` as each supported tag lays
    them out. core_v0.16.1: ``initialize`` holds ``parse_args``/``validate_args``/
    ``_set_random_seed`` by name. core_v0.19.0: ``arguments.parse_and_validate_args`` calls
    ``arguments``' own ``parse_args``/``validate_args``, and ``core_transformer_config_from_args``
    lives in ``argument_utils`` (``arguments`` re-exports it). ``parsing`` and ``validating``
    name the module the entry point calls each from."""
    calls = []
    state = {}

    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        parser = argparse.ArgumentParser()
        parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        args = parser.parse_args(state["argv"])
        args.spec, args.world_size, args.seed = None, 16, 1234
        args.num_attention_heads = args.hidden_size = args.seq_length = None
        return args

    def validate_args(args, defaults={}):
        calls.append(("validate", args.tensor_model_parallel_size))
        state["args"] = args
        return args

    def set_random_seed(seed, *rest):
        calls.append(("seed", seed))

    def build_config(args, config_class=None):
        return ("config", config_class)

    training = types.ModuleType("megatron.training")
    names = ("arguments", "argument_utils", "initialize", "global_vars")
    for name in names:
        setattr(training, name, types.ModuleType(f"megatron.training.{name}"))
    training.arguments.parse_args = parse_args
    training.initialize._set_random_seed = set_random_seed
    training.global_vars.get_args = lambda: state["args"]
    if request.param == "core_v0.16.1":
        parsing = validating = training.initialize
        training.initialize.parse_args = parse_args
        build_config.__module__ = "megatron.training.arguments"
    else:
        parsing = validating = training.arguments
        build_config.__module__ = "megatron.training.argument_utils"
        training.argument_utils.core_transformer_config_from_args = build_config
    validating.validate_args = validate_args
    training.arguments.core_transformer_config_from_args = build_config
    for name in names:
        monkeypatch.setitem(sys.modules, f"megatron.training.{name}", getattr(training, name))
    monkeypatch.setitem(sys.modules, "megatron.training", training)
    return types.SimpleNamespace(training=training, calls=calls, state=state, parsing=parsing,
                                 validating=validating)


def test_launcher_hooks_add_flags_apply_them_and_route_the_spec(fake_megatron_lm, spec_calls,
                                                                monkeypatch):
    from megatron_helix import launch

    initialized = []
    monkeypatch.setattr(launch, "initialize_helix_from_args", initialized.append)
    monkeypatch.setattr(launch, "launched_layer_spec", None)
    launch.install_hooks()
    training = fake_megatron_lm.training
    fake_megatron_lm.state["argv"] = ["--helix-m", "4", "--helix-n", "4"]

    args = fake_megatron_lm.parsing.parse_args(None, False)
    assert training.arguments.parse_args is fake_megatron_lm.parsing.parse_args
    fake_megatron_lm.validating.validate_args(args, {})
    assert fake_megatron_lm.calls == [("validate", 16)]  # applied before Megatron's checks
    assert args.spec == ["megatron_helix.launch", "launched_layer_spec"]
    assert launch.launched_layer_spec == spec_calls[0]
    training.initialize._set_random_seed(1234)
    assert fake_megatron_lm.calls[-1] == ("seed", 1234) and initialized == [args]
    from megatron_helix.config import HelixTransformerConfig

    builders = [training.arguments.core_transformer_config_from_args,
                getattr(training.argument_utils, "core_transformer_config_from_args", None)]
    for build in filter(None, builders):
        assert build(args) == ("config", HelixTransformerConfig)
        assert build(args, dict) == ("config", dict)  # an explicit class still wins


def test_launcher_hooks_fail_before_megatron_validates(fake_megatron_lm):
    from megatron_helix import launch

    launch.install_hooks()
    fake_megatron_lm.state["argv"] = ["--helix-m", "4", "--helix-n", "4",
                                      "--tensor-model-parallel-size", "8"]
    with pytest.raises(HelixConfigError, match="--tensor-model-parallel-size 8 contradicts"):
        fake_megatron_lm.validating.validate_args(fake_megatron_lm.parsing.parse_args(), {})
    assert fake_megatron_lm.calls == []


def test_launcher_refuses_a_patched_tree_and_other_releases(fake_megatron_lm):
    from megatron_helix import launch

    init = fake_megatron_lm.training.initialize
    init.helix_hooks = types.ModuleType("megatron.training.helix_hooks")  # what the patch adds
    with pytest.raises(RuntimeError, match="already carries the megatron_helix patch"):
        launch.install_hooks()
    del init.helix_hooks, init._set_random_seed
    with pytest.raises(RuntimeError, match=r"has no megatron\.training\.initialize\._set"):
        launch.install_hooks()


def test_launcher_runs_the_script_as_main_from_its_own_directory(tmp_path, monkeypatch,
                                                                 fake_megatron_lm):
    from megatron_helix import launch

    script = tmp_path / "train.py"
    out = tmp_path / "out.txt"
    script.write_text(
        "import sys\n"
        f"open({str(out)!r}, 'w').write(repr((__name__, sys.path[0], sys.argv)))\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", ["launch"])
    launch.main([str(script), "--helix-m", "2"])
    assert eval(out.read_text()) == ("__main__", str(tmp_path), [str(script), "--helix-m", "2"])


def test_launcher_usage():
    from megatron_helix import launch

    with pytest.raises(SystemExit, match="usage: python -m megatron_helix.launch"):
        launch.main(["--helix-m", "4"])


def test_incompatibility_table_names_real_flags():
    """Each entry's flag is the attribute's Megatron spelling (a typo would never fire)."""
    for attr, flag, _ in helix_args._INCOMPATIBLE:
        assert flag == "--" + attr.replace("_", "-")

"""Helix attention equals Megatron's single-device attention with the same weights.

One 4-rank gloo world runs every case: the reference is Megatron's own ``SelfAttention`` with
``DotProductAttention`` at TP=1, then the parallel state is rebuilt for each helix ``(m, n)``
and ``HelixSelfAttention`` is loaded with the same (permuted and sharded) weights. Output,
input gradient and every weight gradient must match in fp32.
"""

from __future__ import annotations

import torch

from tests.distributed import run_distributed

LAYOUTS = [(1, 2), (2, 1), (2, 2), (4, 1), (1, 4)]
# (strategy, rope, causal, heads, query groups, head dim)
CASES = [
    ("allreduce", "rotate_half", True, 8, 8, 16),
    ("redistribute", "rotate_half", True, 8, 8, 16),
    ("allreduce", "interleaved", True, 8, 4, 16),
    ("redistribute", "interleaved", True, 8, 4, 16),
    ("allreduce", "none", True, 4, 4, 8),
    ("redistribute", "none", False, 8, 8, 8),
    ("allreduce", "rotate_half", False, 8, 4, 16),
]
SEQ, BATCH = 16, 2


def _config(heads, groups, head_dim, rope, tp):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=head_dim, tensor_model_parallel_size=tp,
        rotary_interleaved=(rope == "interleaved"), add_bias_linear=True,
        attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.05,
        use_cpu_initialization=True, params_dtype=torch.float32,
    )


def _run_attention(holder, x, rotary, mask, dout):
    x = x.clone().requires_grad_(True)
    out, bias = holder.self_attention(x, attention_mask=mask, rotary_pos_emb=rotary)
    out = out + bias
    out.backward(dout)
    grads = {n: p.grad.clone() for n, p in holder.named_parameters()}
    return out.detach(), x.grad, grads


def _build(spec, config, pos_type):
    from megatron.core.transformer.spec_utils import build_module

    holder = torch.nn.Module()
    holder.config = config
    params = dict(spec.params)
    if pos_type is not None:
        params["position_embedding_type"] = pos_type
    holder.self_attention = build_module(
        spec.module, config=config, submodules=spec.submodules, layer_number=1, **params
    )
    return holder


def _inputs(case):
    """Deterministic input, output gradient, rotary frequencies and mask for one case."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    strategy, rope, causal, heads, groups, d = case
    torch.manual_seed(1234)
    x = torch.randn(SEQ, BATCH, heads * d)
    dout = torch.randn(SEQ, BATCH, heads * d)
    rotary = None
    if rope != "none":
        rotary = RotaryEmbedding(d, rotary_percent=1.0, rotary_interleaved=(rope == "interleaved"))(SEQ)
    if causal:
        mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
    else:
        mask = torch.zeros(BATCH, 1, SEQ, SEQ, dtype=torch.bool)
        mask[1, :, :, SEQ - 3:] = True  # padding: the last keys of sample 1
    return x, dout, rotary, mask


def _with_mask_type(spec, causal):
    from megatron.core.transformer.enums import AttnMaskType

    if not causal:
        spec.params = dict(spec.params, attn_mask_type=AttnMaskType.padding)
    return spec


def _attention_cases(rank, world_size):
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_helix import parallel_state as helix_state
    from megatron_helix.checkpoint import to_helix
    from megatron_helix.cpu import enable_cpu_execution
    from megatron_helix.sharding import init_from_seed, shard
    from megatron_helix.specs import get_gpt_layer_helix_spec

    enable_cpu_execution()
    # Reference: Megatron's SelfAttention + DotProductAttention on one device.
    mpu.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(7, inference_rng_tracker=True)
    references = {}
    for case in CASES:
        strategy, rope, causal, heads, groups, d = case
        x, dout, rotary, mask = _inputs(case)
        spec = _with_mask_type(get_gpt_layer_local_spec().submodules.self_attention, causal)
        ref = _build(spec, _config(heads, groups, d, rope, 1), None)
        init_from_seed(ref, seed=11)
        references[case] = _run_attention(ref, x, rotary, mask, dout)
        # The helix spec alone (Megatron-LM's --spec path: no helix groups, so m = 1).
        spec = _with_mask_type(get_gpt_layer_helix_spec().submodules.self_attention, causal)
        alone = _build(spec, _config(heads, groups, d, rope, 1),
                       "rope" if rope != "none" else "none")
        init_from_seed(alone, seed=11)
        out, dx, _ = _run_attention(alone, x, rotary, mask, dout)
        torch.testing.assert_close(out, references[case][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, references[case][1], rtol=1e-5, atol=1e-6)
    mpu.destroy_model_parallel()

    checked = []
    for m, n in LAYOUTS:
        helix_state.initialize_helix(m, n)
        model_parallel_cuda_manual_seed(7, inference_rng_tracker=True)
        for case in CASES:
            strategy, rope, causal, heads, groups, d = case
            if heads % n or groups % n or d % (2 * m):
                continue
            x, dout, rotary, mask = _inputs(case)
            ref_out, ref_dx, ref_grads = references[case]
            spec = get_gpt_layer_helix_spec(score_strategy=strategy).submodules.self_attention
            config = _config(heads, groups, d, rope, m * n)
            model = _build(_with_mask_type(spec, causal), config, "rope" if rope != "none" else "none")
            init_from_seed(model, seed=11)
            out, dx, grads = _run_attention(model, x, rotary, mask, dout)
            layout = model.self_attention.helix_layout
            tag = f"{strategy} {rope} causal={causal} H={heads} G={groups} d={d} m={m} n={n}"

            def close(actual, expected, what):
                torch.testing.assert_close(
                    actual, expected, rtol=1e-5, atol=1e-6, msg=lambda s: f"{tag}: {what} {s}"
                )

            close(out, ref_out, "output")
            close(dx, ref_dx, "input grad")
            for name, param in model.named_parameters():
                full = to_helix(name, ref_grads[name], layout)
                close(grads[name], shard(full, param, name, config), f"grad of {name}")
            used = model.self_attention.core_attention.last_strategy
            assert used == (strategy if m > 1 else "local"), f"{tag}: ran {used}"
            checked.append(tag)
        mpu.destroy_model_parallel()
        helix_state.destroy_helix()
    return checked


def test_helix_attention_matches_single_device():
    results = run_distributed(_attention_cases, 4)
    checked = results[0]
    layouts_seen = {tag.split(" m=")[1] for tag in checked}
    assert layouts_seen == {f"{m} n={n}" for m, n in LAYOUTS}, layouts_seen
    assert len(checked) >= 25

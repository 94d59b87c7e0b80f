"""A decode step's bytes on the wire equal the closed-form formulas, in both helix decode modes.

One spawned 4-rank gloo world builds a Megatron transformer layer with helix 2 x 2 attention
per decode mode and, under a ``CommCounter``, runs one decode step (one new token per
sequence, fp32) against a static KV cache already holding ``CONTEXTS`` tokens. The slice path's
score all-reduce grows linearly with the context; kv-parallel sends the same bytes at every
context length. Both equal ``comm_formulas.helix_decode_bytes`` on the slice group, and the TP
group carries Megatron's forward all-reduces (``tp_layer_bytes``) in both. Byte counts, not
timings.
"""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed

B, HEADS, GROUPS, HEAD_DIM, M, N = 2, 8, 4, 16, 2, 2
HIDDEN = HEADS * HEAD_DIM
FP32 = 4
CONTEXTS = (64, 256, 1024)
MODES = ("kv-parallel", "slices")


def _decode_step(mode, context_length):
    """``{group: (sent, received)}`` of one decode step after ``context_length`` tokens."""
    import torch
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_helix.perf.comm_counter import CommCounter
    from megatron_helix.specs import get_gpt_layer_helix_spec

    model_parallel_cuda_manual_seed(7, inference_rng_tracker=True)
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        tensor_model_parallel_size=M * N, use_cpu_initialization=True,
        params_dtype=torch.float32, attention_dropout=0.0, hidden_dropout=0.0,
    )
    layer = build_module(get_gpt_layer_helix_spec(decode_mode=mode), config=config,
                         layer_number=1).eval()
    context = StaticInferenceContext(max_batch_size=B, max_sequence_length=max(CONTEXTS) + 1)
    context.key_value_memory_dict[1] = _filled_cache(layer, context, mode)
    context.sequence_len_offset = context_length
    with torch.no_grad(), CommCounter() as counter:
        layer(torch.randn(1, B, HIDDEN), attention_mask=None, inference_context=context)
    return {g: (counter.bytes_sent(group=g), counter.bytes_received(group=g))
            for g in {key.group for key in counter.tallies}}


def _refusals():
    """The kv-parallel forward's errors for a padding mask type, positions past the context's
    maximum length and several tokens after the prefill: ``{case: message}``."""
    import torch
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_helix.specs import get_gpt_layer_helix_spec

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        tensor_model_parallel_size=M * N, use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    layer = build_module(get_gpt_layer_helix_spec(decode_mode="kv-parallel"), config=config,
                         layer_number=1).eval()
    messages = {}
    for case, max_length, offset, mask_type in (("padding", 8, 0, AttnMaskType.padding),
                                                ("too long", 2, 0, AttnMaskType.causal),
                                                ("tokens after prefill", 8, 2,
                                                 AttnMaskType.causal)):
        layer.self_attention.attn_mask_type = mask_type
        context = StaticInferenceContext(B, max_length)
        context.sequence_len_offset = offset
        try:
            with torch.no_grad():
                layer(torch.randn(4, B, HIDDEN), attention_mask=None, inference_context=context)
        except (NotImplementedError, ValueError) as error:
            messages[case] = str(error)
    return messages


def _filled_cache(layer, context, mode):
    """A cache of this rank's shape holding ones: earlier tokens as a prefill leaves them."""
    import torch

    rows = context.max_sequence_length
    dims = HEAD_DIM if mode == "kv-parallel" else HEAD_DIM // M
    if mode == "kv-parallel":
        rows = -(-rows // M)
    shape = (rows, B, GROUPS // N, dims)
    return torch.ones(shape), torch.ones(shape)


def _world(rank, world_size):
    from megatron.core import parallel_state as mpu

    from megatron_helix import parallel_state as helix_state
    from megatron_helix.cpu import enable_cpu_execution

    enable_cpu_execution()
    helix_state.initialize_helix(M, N)
    helix_state.helix_manual_seed(7)
    try:
        counts = {(mode, length): _decode_step(mode, length)
                  for mode in MODES for length in CONTEXTS}
        return dict(counts, refusals=_refusals())
    finally:
        mpu.destroy_model_parallel()
        helix_state.destroy_helix()


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_world, 4)


def _formula(mode, context_length):
    """``{group: bytes}`` each rank sends (and receives) per ``comm_formulas``."""
    from megatron_helix.attention.strategy import SliceGroupShape
    from megatron_helix.perf import comm_formulas as f

    shape = SliceGroupShape(m=M, batch=B, seq_q=1, seq_kv=context_length + 1, heads=HEADS // N,
                            kv_heads=GROUPS // N, slice_dim=HEAD_DIM // M, element_bytes=FP32)
    return {"helix_slice": f.helix_decode_bytes(shape, mode),
            "tp": f.tp_layer_bytes(B, HIDDEN, M * N, FP32, sequence_parallel=False,
                                   backward=False)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("context_length", CONTEXTS)
def test_counted_decode_bytes_equal_the_formulas(measured, mode, context_length):
    expected = {g: (n, n) for g, n in _formula(mode, context_length).items()}
    for rank, result in enumerate(measured):
        assert result[(mode, context_length)] == expected, f"rank {rank}"


def test_kv_parallel_is_independent_of_the_context_and_slices_grow_linearly(measured):
    for result in measured:
        kv = [result[("kv-parallel", n)]["helix_slice"][0] for n in CONTEXTS]
        assert kv == [kv[0]] * len(CONTEXTS)
        slices = [result[("slices", n)]["helix_slice"][0] for n in CONTEXTS]
        per_token = [(b - a) / (n1 - n0) for (a, n0), (b, n1) in
                     zip(zip(slices, CONTEXTS), zip(slices[1:], CONTEXTS[1:]))]
        # all-reduce of b x H/n fp32 scores per context token: 2 (m-1) / m of it sent
        assert per_token == [2 * (M - 1) * B * (HEADS // N) * FP32 / M] * 2
        assert kv[0] < slices[0]


def test_kv_parallel_refuses_what_it_does_not_run(measured):
    for result in measured:
        refusals = result["refusals"]
        assert "--helix-decode kv-parallel does not support attention mask type padding" in \
            refusals["padding"]
        assert "exceed the inference context's maximum sequence length 2" in refusals["too long"]
        assert "got 4 tokens after position 2" in refusals["tokens after prefill"]


def test_auto_picks_the_mode_that_sends_fewer_bytes_at_the_maximum_length():
    from megatron_helix.attention.decode_mode import (
        choose_decode_mode,
        kv_parallel_bytes_sent,
        slices_decode_bytes_sent,
    )
    from megatron_helix.attention.strategy import SliceGroupShape

    def shape(m, max_length):
        return SliceGroupShape(m=m, batch=B, seq_q=1, seq_kv=max_length, heads=HEADS // N,
                               kv_heads=GROUPS // N, slice_dim=HEAD_DIM // m, element_bytes=FP32)

    short, long = shape(M, 8), shape(M, 1024)
    assert slices_decode_bytes_sent(short) < kv_parallel_bytes_sent(short)
    assert choose_decode_mode("auto", short) == "slices"
    assert choose_decode_mode("auto", long) == "kv-parallel"
    assert choose_decode_mode("kv-parallel", short) == "kv-parallel"
    assert choose_decode_mode("slices", long) == "slices"
    assert choose_decode_mode("kv-parallel", shape(1, 1024)) == "slices"  # whole heads
    with pytest.raises(ValueError, match="--helix-decode"):
        choose_decode_mode("flash", long)

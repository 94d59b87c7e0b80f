"""KV-cache inference with helix gives the one-device logits, in both decode modes.

One 4-rank world: a prefill of ``PROMPT`` tokens and ``DECODE`` greedy decode steps through
megatron-core's ``StaticInferenceContext``, fp32, on one device and on helix layouts: the slice
path (each rank caches its heads x its dims of every token) and the kv-parallel path (each rank
caches every ``m``-th token of its heads at the full head dim), including a layout with more
ranks than KV groups. Every step's logits match one device within 1e-5, the greedy tokens are
the same, and each rank's cache is ``1/(m n)`` of one device's and ``memory.kv_cache_bytes``.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

LAYERS, HEADS, HIDDEN = 2, 8, 64
HEAD_DIM = HIDDEN // HEADS
PROMPT, DECODE, BATCH = 40, 64, 2
SEQ = PROMPT + DECODE  # the last decode step writes position SEQ - 1
MODEL = ["--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN), "--num-attention-heads",
         str(HEADS), "--group-query-attention", "--seq-length", str(SEQ), "--seed", "3"]
QK_NORM = ("--qk-layernorm", "--normalization", "RMSNorm")
# name -> (KV groups, helix m, helix n, decode mode, other flags); helix None: one device
RUNS = {
    "one device": (4, None, None, None, ()),
    "slices 2x2": (4, 2, 2, "slices", ()),
    "kv-parallel 2x2": (4, 2, 2, "kv-parallel", ()),
    "kv-parallel 4x1": (4, 4, 1, "kv-parallel", ()),
    "one device, 2 KV groups": (2, None, None, None, ()),
    "kv-parallel 2x2, 2 KV groups": (2, 2, 2, "kv-parallel", ()),
    # the q/k norms run on the slices, before the gather to whole heads
    "one device, q/k norms": (4, None, None, None, QK_NORM),
    "kv-parallel 2x2, q/k norms": (4, 2, 2, "kv-parallel", QK_NORM),
}


def _argv(groups, m, n, mode, flags):
    argv = MODEL + ["--num-query-groups", str(groups), *flags]
    if m is not None:
        argv += ["--helix-m", str(m), "--helix-n", str(n), "--helix-decode", mode]
    return argv


def _generate(argv):
    """Greedy decode after a prefill: every step's logits ``[b, s, vocab]``, the greedy
    tokens ``[b, DECODE]``, and every layer's ``(key, value)`` cache shapes on this rank."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_helix.trainer import build_model, build_parser, initialize, teardown, \
        transformer_config

    args = build_parser().parse_args(argv)
    dtype = initialize(args)
    try:
        model = build_model(args, transformer_config(args, dtype)).eval()
        context = StaticInferenceContext(max_batch_size=BATCH, max_sequence_length=args.seq_length)
        tokens = torch.randint(args.vocab_size, (BATCH, PROMPT),
                               generator=torch.Generator().manual_seed(0))
        steps, chosen = [], []
        with torch.no_grad():
            logits = model(tokens, torch.arange(PROMPT).expand(BATCH, -1), None,
                           inference_context=context, runtime_gather_output=True)
            steps.append(logits)
            for i in range(DECODE):
                context.sequence_len_offset += logits.shape[1]
                chosen.append(logits[:, -1:].argmax(-1))
                position = torch.full((BATCH, 1), PROMPT + i)
                logits = model(chosen[-1], position, None, inference_context=context,
                               runtime_gather_output=True)
                steps.append(logits)
        caches = {layer: tuple(tuple(t.shape) for t in kv)
                  for layer, kv in context.key_value_memory_dict.items()}
    finally:
        teardown()
    return steps, torch.cat(chosen, 1), caches


def _world(rank, world_size):
    results = {name: _generate(_argv(*run)) for name, run in RUNS.items()}
    reference = {(groups, flags): results[name]
                 for name, (groups, m, _, _, flags) in RUNS.items() if m is None}
    errors = {}
    for name, (groups, m, _, _, flags) in RUNS.items():
        if m is None:
            continue
        steps, chosen, _ = results[name]
        ref_steps, ref_chosen, _ = reference[groups, flags]
        errors[name] = (max((a - b).abs().max().item() for a, b in zip(steps, ref_steps)),
                        torch.equal(chosen, ref_chosen))
    return {"errors": errors, "caches": {name: r[2] for name, r in results.items()}}


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_world, 4)


@pytest.mark.parametrize("name", [name for name, run in RUNS.items() if run[1] is not None])
def test_prefill_and_greedy_decode_match_one_device(measured, name):
    for rank, result in enumerate(measured):
        error, same_tokens = result["errors"][name]
        assert error <= 1e-5, f"rank {rank}: {name} logits off by {error}"
        assert same_tokens, f"rank {rank}: {name} chose other greedy tokens"


def _cache_bytes(caches):
    return sum(4 * torch.Size(shape).numel() for kv in caches.values() for shape in kv)


@pytest.mark.parametrize("name", [name for name, run in RUNS.items() if run[1] is not None])
def test_cache_per_rank_is_one_over_m_n_of_one_device(measured, name):
    from megatron_helix.layerwise import ModelShape
    from megatron_helix.perf.layouts import ParallelLayout
    from megatron_helix.perf.memory import kv_cache_bytes

    groups, m, n, mode, _ = RUNS[name]
    # [max_seq, b, G/n, d/m] on the slice path; [ceil(max_seq/m), b, G/n, d] kv-parallel
    expected = ((SEQ, BATCH, groups // n, HEAD_DIM // m) if mode == "slices"
                else (-(-SEQ // m), BATCH, groups // n, HEAD_DIM))
    one_device = "one device" + ("" if groups == 4 else ", 2 KV groups")
    model = ModelShape(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                       num_query_groups=groups, ffn_hidden_size=4 * HIDDEN, vocab_size=128)
    formula = kv_cache_bytes(model, ParallelLayout(tp=m * n, helix_m=m), BATCH, SEQ, e=4,
                             kv_parallel=mode == "kv-parallel")
    for rank, result in enumerate(measured):
        caches = result["caches"][name]
        assert set(caches) == set(range(1, LAYERS + 1))
        assert all(kv == (expected, expected) for kv in caches.values()), f"rank {rank}"
        assert _cache_bytes(caches) == formula
        assert _cache_bytes(caches) * m * n == _cache_bytes(result["caches"][one_device])

"""KV-cache inference with helix: each rank caches only its heads x its dims, and a prefill
followed by decode steps gives the one-device logits."""

from __future__ import annotations

import torch

from tests.distributed import run_distributed

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
         "--group-query-attention", "--num-query-groups", "4", "--seq-length", "16",
         "--seed", "3"]
PROMPT, DECODE, BATCH = 6, 4, 2


def _generate(argv):
    """Greedy decode after a prefill; returns every step's logits ``[b, s, vocab]`` and the
    shape of layer 1's key cache on this rank."""
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
        steps = []
        with torch.no_grad():
            logits = model(tokens, torch.arange(PROMPT).expand(BATCH, -1), None,
                           inference_context=context, runtime_gather_output=True)
            steps.append(logits)
            for i in range(DECODE):
                context.sequence_len_offset += logits.shape[1]
                nxt = logits[:, -1:].argmax(-1)
                position = torch.full((BATCH, 1), PROMPT + i)
                logits = model(nxt, position, None, inference_context=context,
                               runtime_gather_output=True)
                steps.append(logits)
        cache_shape = tuple(context.key_value_memory_dict[1][0].shape)
    finally:
        teardown()
    return steps, cache_shape


def _compare(rank, world_size):
    reference, ref_cache = _generate(MODEL)
    helix, helix_cache = _generate(MODEL + ["--helix-m", "2", "--helix-n", "2"])
    for step, (a, b) in enumerate(zip(reference, helix)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    return ref_cache, helix_cache


def test_helix_kv_cache_inference_matches_one_device():
    (ref_cache, helix_cache), *_ = run_distributed(_compare, 4)
    # [max_seq, batch, kv heads, head dim]: helix 2 x 2 keeps G/n = 2 heads of d/m = 4 dims
    assert ref_cache == (16, BATCH, 4, 8)
    assert helix_cache == (16, BATCH, 2, 4)

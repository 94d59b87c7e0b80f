"""The Hugging Face export of a helix-trained Llama-style model loads in ``transformers`` and
its logits equal the Megatron model's within 1e-5 (fp32).

A Llama-style GPT (SwiGLU, RMSNorm, RoPE with a non-default base, 8 heads on 2 query groups,
untied, no biases) trains two steps with the plugin trainer at helix (2,2) on four gloo
ranks, saving every step. At one rank, ``python -m megatron_helix.hf_export``'s ``main`` exports
the newest checkpoint; ``LlamaForCausalLM.from_pretrained`` reads the directory, and its logits
on a token batch must equal those of Megatron's own one-rank model (local spec), loaded by
this test from ``iter_0000002``, within 1e-5 absolute. The largest |logit| is about 1.5 and is
checked to be above 0.1, so the absolute bound is at least as tight as 1e-5 relative to it.

The comparison can fail: the trained model's logits differ from the freshly initialized
model's by far more than the tolerance (so exporting the seed's model, the older checkpoint or
a half-loaded one would fail), and ``llama_config`` refuses what a Llama cannot express.
Mistakes in the mapping itself, measured once on this checkpoint (largest |logit difference|
over the largest |logit|): layer-0 norms swapped 4e-3, two query heads of a group swapped 3e-3,
interleaved instead of rotate-half RoPE pairs 3e-3, rope_theta 10000 for 500 2e-3, gate and up
projections swapped 1e-2; the export itself is off by 2e-7.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.distributed import run_distributed

# Checked without importing them: every spawned rank imports this module.
if not all(importlib.util.find_spec(name) for name in ("mbridge", "transformers")):
    raise ImportError('tests/test_hf_export.py needs pip install "megatron_helix[hf]"')

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
         "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32",
         "--vocab-size", "128", "--swiglu", "--normalization", "RMSNorm",
         "--disable-bias-linear", "--position-embedding-type", "rope", "--rotary-base", "500",
         "--untie-embeddings-and-output-weights", "--seed", "3"]
TRAIN = ["--helix-m", "2", "--helix-n", "2", "--micro-batch-size", "2", "--train-iters", "2",
         "--save-interval", "1"]
NEWEST = "iter_0000002"
TOLERANCE = 1e-5


def _train(rank, world_size, directory):
    from megatron_helix.trainer import build_parser, train

    return [m["loss"] for m in train(build_parser().parse_args(
        [*MODEL, *TRAIN, "--save", directory]))]


def _logits(model, tokens):
    """``[b, s, vocab]`` logits of a megatron-core GPTModel for ``[b, s]`` tokens."""
    import torch

    s = tokens.shape[1]
    positions = torch.arange(s).expand_as(tokens)
    causal = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    return model(tokens, positions, causal)


def _export_and_compare(checkpoint, output):
    """Export through the CLI's ``main``; compare the Llama's logits with Megatron's."""
    import torch
    from megatron.core import dist_checkpointing
    from transformers import LlamaForCausalLM

    from megatron_helix import hf_export
    from megatron_helix.trainer import (build_model, build_parser, initialize, teardown,
                                        transformer_config)

    hf_export.main([*MODEL, "--load", checkpoint, "--output", output])
    llama = LlamaForCausalLM.from_pretrained(output, dtype=torch.float32).eval()

    args = build_parser().parse_args(MODEL)
    config = transformer_config(args, initialize(args))
    fresh = build_model(args, config).eval()
    trained = build_model(args, config).eval()
    loaded = dist_checkpointing.load({"model": trained.sharded_state_dict()},
                                     os.path.join(checkpoint, NEWEST))
    trained.load_state_dict(loaded["model"])
    tokens = torch.randint(128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        megatron, hugging_face = _logits(trained, tokens), llama(input_ids=tokens).logits
        untrained = _logits(fresh, tokens)
    teardown()
    return {
        "diff": float((hugging_face - megatron).abs().max()),
        "scale": float(megatron.abs().max()),
        "trained_vs_fresh": float((megatron - untrained).abs().max()),
        "kv_heads": llama.config.num_key_value_heads,
    }


def _refusals():
    """``llama_config``'s messages for a LayerNorm/GELU/bias model and a tied one."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_helix.hf_export import llama_config
    from megatron_helix.trainer import (build_model, build_parser, initialize, teardown,
                                        transformer_config)

    def refusal(model):
        try:
            llama_config(model)
        except ValueError as error:
            return str(error)
        return None

    gpt_args = build_parser().parse_args(["--normalization", "LayerNorm"])
    gpt = build_model(gpt_args, transformer_config(gpt_args, initialize(gpt_args)))
    teardown()
    args = build_parser().parse_args(MODEL)
    config = transformer_config(args, initialize(args))
    tied = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm"), vocab_size=128, max_sequence_length=32,
        position_embedding_type="rope", share_embeddings_and_output_weights=True)
    teardown()
    return {"LayerNorm GPT": refusal(gpt), "tied": refusal(tied)}


def _one_rank(rank, world_size, checkpoint, output):
    return {"export": _export_and_compare(checkpoint, output), "refusals": _refusals()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_export")
    checkpoint, output = str(root / "checkpoint"), str(root / "llama")
    losses = run_distributed(_train, 4, checkpoint)[0]
    return {"losses": losses, **run_distributed(_one_rank, 1, checkpoint, output)[0]}


def test_export_logits_equal_megatron(results):
    export = results["export"]
    assert export["kv_heads"] == 2, export  # still grouped-query: not KV heads repeated to 8
    assert export["scale"] > 0.1, export  # an absolute bound on logits near zero would say little
    assert export["diff"] <= TOLERANCE, export


def test_comparison_sees_the_trained_weights(results):
    export = results["export"]
    assert results["losses"][-1] < results["losses"][0], results["losses"]
    assert export["trained_vs_fresh"] > 1e3 * TOLERANCE, export


def test_llama_config_refuses_what_a_llama_cannot_express(results):
    refusals = results["refusals"]
    assert refusals["LayerNorm GPT"] is not None
    for reason in ("LayerNorm, not RMSNorm", "not SwiGLU", "biases"):
        assert reason in refusals["LayerNorm GPT"], refusals
    assert refusals["tied"] is not None and "tied to the embedding" in refusals["tied"], refusals

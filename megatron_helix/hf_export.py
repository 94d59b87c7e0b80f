"""Export a trained Llama-style GPT to a Hugging Face ``LlamaForCausalLM`` directory.

    python -m megatron_helix.hf_export --load CKPT_DIR --output HF_DIR <the trainer's model flags>

The plugin trainer's torch_dist checkpoints hold the model in the standard single-device layout
whatever helix (m, n) trained it, so the export needs no helix: it builds the model as the
trainer does at one rank (Megatron's own local spec), loads the model part of the newest
checkpoint and hands it to mbridge (ISEEKYAN/mbridge), which maps megatron-core's GPT weights
to Llama's (QKV split per query group, fused gate/up split). The one addition here is the two
layer-norm names of Megatron's local spec, which mbridge's ``LLaMABridge`` does not know.

Only what a Llama expresses is exported: RMSNorm, SwiGLU, no biases, untied embeddings, RoPE
over the whole head (rotate-half pairing); anything else is refused by ``llama_config``.
Needs ``pip install "megatron_helix[hf]"`` (mbridge, transformers, safetensors).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_helix.trainer_checkpoint import newest_checkpoint

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from transformers import LlamaConfig

_HF_PACKAGES = ("mbridge", "transformers", "safetensors", "einops")


def _import_hf(module: str):
    """Import ``module`` (of mbridge or transformers), naming the extra to install when one of
    the ``hf`` extra's packages is missing (any other import error is left as it is)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in _HF_PACKAGES:
            raise
        raise ImportError(f"the Hugging Face export needs {error.name}: "
                          f'pip install "megatron_helix[hf]"') from error


def _unexpressible(model: "GPTModel") -> List[str]:
    """What of ``model`` a Hugging Face Llama cannot express (empty when it can)."""
    config = model.config
    checks = [
        (config.normalization != "RMSNorm",
         f"normalization is {config.normalization}, not RMSNorm"),
        (not config.gated_linear_unit or config.activation_func is not F.silu,
         "the MLP is not SwiGLU (--swiglu: gated linear unit with SiLU)"),
        (config.add_bias_linear or config.add_qkv_bias, "linear layers have biases"),
        (model.share_embeddings_and_output_weights,
         "the output layer is tied to the embedding (Llama here is untied)"),
        (config.qk_layernorm, "queries and keys are normalized (qk-layernorm)"),
        (model.position_embedding_type != "rope",
         f"position embedding is {model.position_embedding_type}, not rope"),
        (config.rotary_interleaved, "RoPE pairs interleaved channels (Llama rotates halves)"),
        (model.rotary_percent != 1.0, f"RoPE covers {model.rotary_percent} of each head, not all"),
        (model.rotary_scaling, "RoPE has Llama 3.x frequency scaling (not exported)"),
        (config.num_moe_experts, "the MLP is a mixture of experts"),
        (config.multi_latent_attention, "attention is multi-latent"),
        (config.layernorm_zero_centered_gamma, "norm weights are zero-centred"),
        (config.apply_residual_connection_post_layernorm,
         "the residual is taken after the layer norm"),
        (config.softmax_scale is not None, "attention has a custom softmax scale"),
        (not (model.pre_process and model.post_process),
         "this is one pipeline stage, not the whole model"),
    ]
    return [reason for failed, reason in checks if failed]


def llama_config(model: "GPTModel") -> "LlamaConfig":
    """The Hugging Face ``LlamaConfig`` of a megatron-core ``GPTModel``.

    Read from the model itself (its ``TransformerConfig`` and the GPT-level options: vocabulary,
    sequence length, rotary base, tying), so the Llama cannot disagree with what was trained;
    the vocabulary is the model's as built (padded, if it was).

    Raises:
        ValueError: listing everything of ``model`` a Llama cannot express.
    """
    problems = _unexpressible(model)
    if problems:
        raise ValueError("not exportable as a Hugging Face Llama: " + "; ".join(problems))
    transformers = _import_hf("transformers")
    config = model.config
    return transformers.LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups, head_dim=config.kv_channels,
        max_position_embeddings=model.max_sequence_length, rope_theta=float(model.rotary_base),
        rms_norm_eps=config.layernorm_epsilon, hidden_act="silu", tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, dtype=config.params_dtype,
    )


@functools.lru_cache(maxsize=None)
def _local_spec_bridge_class():
    """mbridge's ``LLaMABridge`` plus the layer-norm names of Megatron's local spec.

    mbridge knows the norms only where Transformer Engine's spec fuses them into the next
    linear layer (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); the local
    spec keeps them as modules of their own (``input_layernorm``, ``pre_mlp_layernorm``). The
    class is made on first use so that mbridge is imported only by an export.
    """
    LLaMABridge = _import_hf("mbridge.models.llama").LLaMABridge

    class LocalSpecLlamaBridge(LLaMABridge):
        # mbridge looks a layer's non-attention names up by substring: those containing
        # "mlp" in _MLP_MAPPING, the others in _OTHER_MAPPING.
        _OTHER_MAPPING = {
            **LLaMABridge._OTHER_MAPPING,
            "input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"],
        }
        _MLP_MAPPING = {
            "pre_mlp_layernorm.weight": [
                "model.layers.{layer_number}.post_attention_layernorm.weight"],
            **LLaMABridge._MLP_MAPPING,
        }

    return LocalSpecLlamaBridge


def llama_state_dict(model: "GPTModel", config: "LlamaConfig") -> Dict[str, torch.Tensor]:
    """``model``'s weights under Llama's names and shapes (mbridge's mapping), as fresh
    contiguous tensors: ``q_proj`` ``[heads * head_dim, hidden]``, ``k_proj``/``v_proj``
    ``[groups * head_dim, hidden]``, ``gate_proj``/``up_proj`` ``[ffn, hidden]``, ...

    ``model`` must be whole at this rank: mbridge would gather tensor-parallel shards as
    Megatron cuts them, which is not how helix cuts attention.
    """
    from megatron.core import parallel_state as mpu

    if mpu.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("export a model built at one rank (tensor-parallel size 1): the "
                         "checkpoint holds the standard tensors, which load there at any layout")
    bridge = _local_spec_bridge_class()(config, dtype=config.dtype)
    return {name: tensor.detach().clone(memory_format=torch.contiguous_format)
            for name, tensor in bridge.export_weights([model])}


def export_llama(model: "GPTModel", directory: str) -> "LlamaConfig":
    """Write ``model`` (a megatron-core ``GPTModel`` whole at one rank, Megatron's local spec)
    to ``directory`` as a Hugging Face ``LlamaForCausalLM``: ``config.json`` and safetensors.

    The Llama is built on the meta device and takes the exported tensors as its parameters, so
    every Llama parameter must come from ``model`` and nothing else (strict load), and no
    weights are initialized only to be overwritten. Returns the ``LlamaConfig`` written.
    """
    config = llama_config(model)
    weights = llama_state_dict(model, config)
    transformers = _import_hf("transformers")
    with torch.device("meta"):
        llama = transformers.LlamaForCausalLM(config)
    llama.load_state_dict(weights, strict=True, assign=True)
    llama.save_pretrained(directory, safe_serialization=True)
    return config


def load_newest_checkpoint(model: "GPTModel", directory: str) -> "GPTModel":
    """Load into ``model`` the model part (no optimizer, no RNG state) of the newest checkpoint
    of a trainer ``--save`` directory; returns ``model`` in eval mode.

    The checkpoint holds the standard tensors whatever layout wrote it, so a one-rank model
    built with Megatron's local spec reads a helix-trained one.
    """
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                     newest_checkpoint(directory))
    model.load_state_dict(loaded["model"])
    return model.eval()


def build_parser() -> argparse.ArgumentParser:
    """The trainer's parser (its model flags and their defaults, so the training command line
    describes the model) with ``--output``; ``--load`` names the trainer's ``--save``
    directory. Layout flags must stay at one rank: the export runs as a single process."""
    from megatron_helix.trainer import build_parser as trainer_parser

    parser = trainer_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument_group("Hugging Face export").add_argument(
        "--output", required=True, help="directory for the LlamaForCausalLM (config + safetensors)")
    return parser


@contextlib.contextmanager
def _one_rank_process_group() -> Iterator[None]:
    """A single-process gloo group for Megatron's parallel state, unless one exists already
    (a test's one-rank world); destroyed only if made here."""
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if made:
            dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> str:
    """Export the newest checkpoint of ``--load`` to ``--output``; returns ``--output``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.load is None:
        parser.error("--load (the trainer's --save directory) is required")
    _import_hf("mbridge")  # fail before any model is built
    from megatron_helix.trainer import build_model, initialize, teardown, transformer_config

    with _one_rank_process_group():
        dtype = initialize(args)  # one rank; refuses a checkpoint that no layout reads
        try:
            model = build_model(args, transformer_config(args, dtype))
            llama_config(model)  # refuse a model no Llama expresses before reading the checkpoint
            export_llama(load_newest_checkpoint(model, args.load), args.output)
        finally:
            teardown()
    return args.output


if __name__ == "__main__":
    main()

"""``megatron_helix.compat``: the installed megatron-core is in the supported range, and each
release difference resolves to what that release needs."""

from __future__ import annotations

import inspect

import pytest
import torch

from megatron_helix import compat
from tests.distributed import run_distributed


def test_installed_release_is_supported_and_others_are_named():
    compat.check_supported()
    for outside in [(0, 16, 0), (0, 20, 0), (1, 0, 0)]:
        with pytest.raises(RuntimeError) as error:
            compat.check_supported(outside)
        message = str(error.value)
        assert ".".join(map(str, outside)) in message
        assert "megatron-core>=0.16.1,<0.20" in message


def test_self_attention_gets_exactly_the_arguments_its_release_takes():
    from megatron.core.transformer.attention import SelfAttention

    accepted = set(inspect.signature(SelfAttention.__init__).parameters)
    given = compat.self_attention_kwargs(pp_layer_offset=None, name=None)
    assert set(given) == {"pp_layer_offset", "name"} & accepted
    if "name" in accepted:
        assert compat.self_attention_kwargs(name="layers.0") == {"name": "layers.0"}
    else:  # a value the release cannot take is an error, never dropped
        with pytest.raises(TypeError, match="takes no name"):
            compat.self_attention_kwargs(name="layers.0")


def _split_over_the_context_parallel_group(rank, world):
    from megatron.core import parallel_state

    from megatron_helix.attention.zigzag import zigzag_shard

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2,
                                             context_parallel_size=2)
    tokens = torch.arange(16).repeat(2, 1)  # [b, s]
    got = compat.get_batch_on_this_cp_rank({"tokens": tokens.clone()})["tokens"]
    cp_rank = parallel_state.get_context_parallel_rank()
    return torch.equal(got, zigzag_shard(tokens, cp_rank, 2, dim=1))


def test_batch_is_split_over_the_context_parallel_group_not_the_world():
    """TP 2 x CP 2 on 4 ranks: each rank holds its CP rank's zigzag half (a split over all 4
    ranks, what megatron-core 0.19 does without a group, would hold a quarter)."""
    assert run_distributed(_split_over_the_context_parallel_group, 4) == [True] * 4


def test_helix_attention_refuses_config_features_it_does_not_build():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_helix.attention.helix_self_attention import _refuse_unsupported
    from megatron_helix.specs import get_gpt_layer_helix_spec

    submodules = get_gpt_layer_helix_spec().submodules.self_attention.submodules
    for field, flag in [("qk_clip", "--qk-clip"), ("qk_l2_norm", "--qk-l2-norm"),
                        ("log_max_attention_logit", "--log-max-attention-logit")]:
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                                   **{field: True})
        with pytest.raises(ValueError, match=f"does not support: {flag} "):
            _refuse_unsupported(config, submodules, 2)

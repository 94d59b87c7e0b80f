"""``HelixTransformerConfig``: the library path checks helix layouts when the config is built,
before any module, and names the helix sizes rather than Megatron's plain-TP rule."""

from __future__ import annotations

import pytest

from megatron_helix.config import HelixTransformerConfig
from megatron_helix.parallel_dims import HelixConfigError

SHAPE = dict(num_layers=2, hidden_size=48, num_attention_heads=6, use_cpu_initialization=True)


def test_heads_need_divide_only_by_n():
    config = HelixTransformerConfig(helix_m=2, tensor_model_parallel_size=4, **SHAPE)
    assert config.tensor_model_parallel_size == 4 and config.num_query_groups == 6


@pytest.mark.parametrize("helix_m, tp, message", [
    (1, 4, "--helix-n 4 must divide --num-attention-heads 6"),
    (2, 8, "--helix-n 4 must divide --num-attention-heads 6"),
    (3, 4, "tensor_model_parallel_size 4 must be --helix-m 3 x --helix-n"),
    (3, 3, "--helix-m 3 must divide the head dim 8"),
])
def test_impossible_layouts_name_the_helix_sizes(helix_m, tp, message):
    with pytest.raises(HelixConfigError) as error:
        HelixTransformerConfig(helix_m=helix_m, tensor_model_parallel_size=tp, **SHAPE)
    assert message in str(error.value)
    assert "--num-query-groups" not in str(error.value)  # never set: not mentioned

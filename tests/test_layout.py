"""Exhaustive checks of the helix rank arithmetic (no process groups)."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_helix.checkpoint import helix_to_standard, standard_to_helix
from megatron_helix.layout import HelixLayout, HelixLayoutError, inverse_permutation, layout_errors
from megatron_helix.parallel_dims import (
    HelixConfigError,
    HelixParallelDims,
    model_errors,
    size_errors,
)

PAIRINGS = ("rotate_half", "interleaved", "none")


def _valid_layouts():
    for heads, groups, d, m, n, pairing in itertools.product(
        (1, 2, 3, 4, 6, 8, 16, 32), (1, 2, 4, 8, 16, 32), (2, 4, 8, 12, 16, 32, 64, 128),
        (1, 2, 3, 4, 8), (1, 2, 3, 4, 8, 16), PAIRINGS,
    ):
        if groups > heads or layout_errors(m, n, heads, groups, d, pairing):
            continue
        yield HelixLayout(m, n, heads, groups, d, pairing)


LAYOUTS = list(_valid_layouts())


def test_there_are_many_layouts():
    assert len(LAYOUTS) > 2000


def test_rank_coordinates_round_trip_and_slice_groups_are_contiguous():
    for layout in LAYOUTS:
        seen = set()
        for rank in range(layout.size):
            g, j = layout.coords(rank)
            assert layout.rank(g, j) == rank
            assert rank // layout.m == g  # the m ranks of one head group are contiguous
            seen.add((g, j))
        assert len(seen) == layout.size


def test_slices_partition_the_head_dims_and_keep_rope_pairs_together():
    for layout in LAYOUTS:
        d = layout.head_dim
        owner = {}
        for j in range(layout.m):
            dims = layout.slice_dims(j)
            assert len(dims) == layout.slice_dim
            for i in dims:
                assert i not in owner
                owner[i] = j
        assert sorted(owner) == list(range(d))
        if layout.rope_pairing == "rotate_half":
            for i in range(d // 2):
                assert owner[i] == owner[i + d // 2]
            # the local slice is itself rotate-half: local i pairs with local i + d/2m
            for j in range(layout.m):
                dims = layout.slice_dims(j)
                half = len(dims) // 2
                assert all(dims[i] + d // 2 == dims[i + half] for i in range(half))
        elif layout.rope_pairing == "interleaved":
            for i in range(0, d, 2):
                assert owner[i] == owner[i + 1]


def test_qkv_permutation_gives_each_rank_its_heads_and_dims():
    for layout in LAYOUTS[::7]:
        perm = layout.qkv_row_permutation()
        d, q_per_kv = layout.head_dim, layout.num_heads // layout.num_query_groups
        assert sorted(perm) == list(range((layout.num_heads + 2 * layout.num_query_groups) * d))
        rows_per_rank = len(perm) // layout.size
        for rank in range(layout.size):
            g, j = layout.coords(rank)
            local = perm[rank * rows_per_rank:(rank + 1) * rows_per_rank]
            kv_groups = {row // ((q_per_kv + 2) * d) for row in local}
            assert kv_groups == set(range(g * layout.query_groups_per_group,
                                          (g + 1) * layout.query_groups_per_group))
            assert {row % d for row in local} == set(layout.slice_dims(j))


def test_proj_permutation_matches_the_core_attention_output_order():
    for layout in LAYOUTS[::7]:
        perm = layout.proj_col_permutation()
        d = layout.head_dim
        assert sorted(perm) == list(range(layout.num_heads * d))
        cols = len(perm) // layout.size
        for rank in range(layout.size):
            g, j = layout.coords(rank)
            local = perm[rank * cols:(rank + 1) * cols]
            expected = [h * d + i for h in layout.heads(g) for i in layout.slice_dims(j)]
            assert local == expected


def test_inverse_permutation_and_state_dict_round_trip():
    layout = HelixLayout(2, 2, 8, 4, 16)
    perm = layout.qkv_row_permutation()
    inv = inverse_permutation(perm)
    assert [perm[i] for i in inv] == list(range(len(perm)))
    full = {
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(16 * 16, 128),
        "decoder.layers.0.self_attention.linear_qkv.bias": torch.randn(16 * 16),
        "decoder.layers.0.self_attention.linear_proj.weight": torch.randn(128, 128),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(512, 128),
    }
    helix = standard_to_helix(full, layout)
    assert not torch.equal(helix["decoder.layers.0.self_attention.linear_qkv.weight"],
                           full["decoder.layers.0.self_attention.linear_qkv.weight"])
    assert torch.equal(helix["decoder.layers.0.mlp.linear_fc1.weight"],
                       full["decoder.layers.0.mlp.linear_fc1.weight"])
    back = helix_to_standard(helix, layout)
    for name in full:
        assert torch.equal(back[name], full[name])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(m=2, n=3, num_heads=8, num_query_groups=8, head_dim=16), "--helix-n 3 must divide --num-attention-heads 8"),
        (dict(m=1, n=4, num_heads=8, num_query_groups=2, head_dim=16), "--num-query-groups 2"),
        (dict(m=4, n=1, num_heads=8, num_query_groups=8, head_dim=12), "divisible by 2*m = 8"),
        (dict(m=3, n=1, num_heads=8, num_query_groups=8, head_dim=16, rope_pairing="none"), "--helix-m 3 must divide the head dim 16"),
    ],
)
def test_invalid_layouts_name_the_flag_and_a_fix(kwargs, fragment):
    with pytest.raises(HelixLayoutError) as err:
        HelixLayout(**kwargs)
    assert fragment in str(err.value)
    assert "works" in str(err.value)


def test_parallel_dims_refuse_impossible_sizes_on_construction():
    with pytest.raises(HelixConfigError) as err:
        HelixParallelDims(world_size=12, m=4, n=4, ring=1, pp=1)
    assert "world size 12 is not divisible by --helix-m 4 x --helix-n 4" in str(err.value)
    assert "one of [1, 2, 3, 4, 6, 12]" in str(err.value)
    with pytest.raises(HelixConfigError, match="--helix-ring-size must be >= 1, got 0"):
        HelixParallelDims(world_size=4, ring=0)
    with pytest.raises(HelixConfigError, match="world size 6 is not divisible"):
        HelixParallelDims(world_size=6, m=2, n=2)  # no silent rounding of the data-parallel size
    assert HelixParallelDims(world_size=16, m=2, n=2, pp=2).dp == 2


def test_parallel_dims_report_every_problem_at_once():
    problems = size_errors(12, m=4, n=4) + model_errors(
        4, 4, 1, num_heads=6, num_query_groups=6, head_dim=12, seq_length=10
    )
    text = "\n".join(problems)
    assert "world size 12" in text and "--helix-n 4 must divide --num-attention-heads 6" in text
    assert "2*m = 8" in text
    ring = HelixParallelDims(world_size=4, ring=4)
    with pytest.raises(HelixConfigError, match="--seq-length 20 must be divisible by 2 x --helix-ring-size"):
        ring.check_model(seq_length=20)
    assert ring.check_model(seq_length=24) is ring
